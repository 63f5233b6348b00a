// What each delivered chunk costs the tabs, counted rather than timed: how often the leader
// and the followers wake (bus messages by type, socket messages, the leader's outbox hop,
// timers) per chunk, and a CPU profile of the leader and one follower over 2 s. This is
// the "which tasks run per chunk" view behind measure.js's TaskDuration figure.
//
//   node e2e/wakeups.js [--tabs 6,30] [--no-profile] [--static DIR]
import path from 'node:path'
import { readRun, sleep, startAll, startStack, underWay, userNamer, withTabs } from './harness.js'

const args = process.argv.slice(2)
const opt = (name, dflt) => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : dflt }
const sizes = opt('tabs', '6,30').split(',').map(Number)
const profile = !args.includes('--no-profile')
const staticDir = opt('static', undefined) && path.resolve(opt('static')) // another shim, as in measure.js

/** Runs in every page before the shim: counts what wakes the page in window.__wakeups. */
function instrument () {
  const c = window.__wakeups = {}
  const inc = k => { c[k] = (c[k] ?? 0) + 1 }
  const NativeBC = window.BroadcastChannel
  window.BroadcastChannel = class extends NativeBC {
    set onmessage (fn) { super.onmessage = fn && ((e) => { inc(`read ${e.data?.t}`); fn(e) }) }
    get onmessage () { return super.onmessage }
    postMessage (d) { inc(`post ${d?.t}`); return super.postMessage(d) }
  }
  const NativeWS = window.WebSocket
  window.WebSocket = class extends NativeWS {
    set onmessage (fn) { super.onmessage = fn && ((e) => { inc('socket message'); fn(e) }) }
    get onmessage () { return super.onmessage }
  }
  // the leader's outbox flush runs in a task of its own, through a MessageChannel
  const NativeMC = window.MessageChannel
  const port = Object.getOwnPropertyDescriptor(MessagePort.prototype, 'onmessage')
  window.MessageChannel = class extends NativeMC {
    constructor () {
      super()
      const p = this.port1
      Object.defineProperty(p, 'onmessage', { set (fn) { port.set.call(p, fn && ((e) => { inc('outbox hop'); fn(e) })) }, get () { return port.get.call(p) } })
    }
  }
  const every = window.setInterval
  window.setInterval = (fn, ms, ...a) => every(() => { inc(`interval ${ms} ms`); fn(...a) }, ms)
  const once = window.setTimeout
  window.setTimeout = (fn, ms, ...a) => once(() => { inc('timeout'); if (typeof fn === 'function') fn(...a) }, ms)
}

/** Self time per function of a CPU profile, the biggest first. */
function topFunctions (p, n = 8) {
  const byId = new Map(p.nodes.map(x => [x.id, x]))
  const self = new Map()
  p.samples.forEach((id, i) => {
    const f = byId.get(id).callFrame
    const key = `${f.functionName || '(anonymous)'}${f.url ? ` ${f.url.split('/').pop()}:${f.lineNumber + 1}` : ''}`
    self.set(key, (self.get(key) ?? 0) + (p.timeDeltas[i] ?? 0) / 1000)
  })
  return [...self].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, ms]) => `${k} ${ms.toFixed(1)} ms`).join(', ')
}

const stack = await startStack({ staticDir })
try {
  for (const N of sizes) {
    await withTabs({ base: stack.gateway.url, user: userNamer('wakeups')(`n${N}`), n: N, initScript: instrument }, async ({ context, pages, li }) => {
      await sleep(500)
      await Promise.all(pages.map(p => p.evaluate(() => { for (const k of Object.keys(window.__wakeups)) delete window.__wakeups[k] })))
      const shape = { chunks: 100, delayMs: 50 }
      await startAll(pages, 'wake', shape)
      let profiles = null
      if (profile) {
        await underWay(pages, 'wake', 3)
        const fi = (li + 1) % N
        const cdps = await Promise.all([li, fi].map(async i => {
          const c = await context.newCDPSession(pages[i])
          await c.send('Profiler.enable')
          await c.send('Profiler.start')
          return c
        }))
        await sleep(2000)
        profiles = await Promise.all(cdps.map(c => c.send('Profiler.stop')))
      }
      for (;;) {
        const runs = await Promise.all(pages.map(p => readRun(p, 'wake')))
        if (runs.every(r => r && r.ended)) break
        await sleep(250)
      }
      const counts = await Promise.all(pages.map(p => p.evaluate(() => window.__wakeups)))
      const runs = await Promise.all(pages.map(p => readRun(p, 'wake')))
      const chunks = runs.reduce((a, r) => a + r.deltas, 0)
      const perChunk = (tabs) => {
        const sum = {}
        for (const i of tabs) for (const [k, v] of Object.entries(counts[i])) sum[k] = (sum[k] ?? 0) + v
        return Object.fromEntries(Object.entries(sum).sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, Number((v / chunks).toFixed(3))]))
      }
      const followers = pages.map((_, i) => i).filter(i => i !== li)
      console.log(JSON.stringify({ tabs: N, chunks, leaderPerChunk: perChunk([li]), followersPerChunk: perChunk(followers) }))
      if (profiles) {
        console.log(`  leader, 2 s: ${topFunctions(profiles[0].profile)}`)
        console.log(`  a follower, 2 s: ${topFunctions(profiles[1].profile)}`)
      }
    })
  }
} finally { await stack.stop() }
