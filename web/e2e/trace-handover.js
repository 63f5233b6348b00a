// Where a leader-closed handover's time goes at 30 tabs: one run, every tab instrumented by an
// init script (lock grants, bus messages read, the new socket's open, welcome and replay),
// printed as a timeline relative to the moment the leader's page was closed.
//
//   node e2e/trace-handover.js [--tabs 30] [--static DIR] [--all-focused]
//
// One foreground tab (the last opened) unless --all-focused, as in measure.js.
import path from 'node:path'
import { readRun, sleep, startAll, startStack, underWay, userNamer, withTabs } from './harness.js'

const args = process.argv.slice(2)
const N = Number(args[args.indexOf('--tabs') + 1] || 30) || 30
const focus = args.includes('--all-focused') ? 'all' : 'one'

/** Runs in every page before the shim: records what the handover is made of in window.__trace. */
function instrument () {
  const trace = window.__trace = []
  const now = () => performance.timeOrigin + performance.now()
  const note = (what, extra) => trace.push([now(), what, extra])
  const NativeBC = window.BroadcastChannel
  window.BroadcastChannel = class extends NativeBC {
    set onmessage (fn) {
      super.onmessage = fn && ((event) => {
        const t = event.data?.t
        if (t && t !== 'hb' && t !== 'ack') note(`bus:${t}`, { from: event.data.from, n: event.data.frames?.length })
        const start = now()
        fn(event)
        const took = now() - start
        if (took > 5) note(`bus:${t}:slow`, { ms: Math.round(took) })
      })
    }

    get onmessage () { return super.onmessage }
  }
  const locks = navigator.locks
  const request = locks.request.bind(locks)
  locks.request = (name, options, cb) => request(name, options, (lock) => {
    if (lock) note('lock:granted', { steal: !!options.steal })
    return cb(lock)
  })
  const NativeWS = window.WebSocket
  window.WebSocket = class extends NativeWS {
    constructor (...a) {
      super(...a)
      note('ws:new')
      let n = 0
      this.addEventListener('open', () => note('ws:open'))
      this.addEventListener('message', (e) => {
        n++
        if (n === 1) note('ws:first', { type: JSON.parse(e.data).type })
        if (n === 2) note('ws:second')
      })
    }

    send (data) {
      if (data.includes('"hello"')) note('ws:hello', { resume: JSON.parse(data).resume?.length })
      return super.send(data)
    }
  }
  // long tasks on this page's main thread
  try {
    new PerformanceObserver(list => { for (const e of list.getEntries()) note('longtask', { ms: Math.round(e.duration), at: performance.timeOrigin + e.startTime }) })
      .observe({ type: 'longtask', buffered: false })
  } catch {}
}

const staticDir = args.includes('--static') ? path.resolve(args[args.indexOf('--static') + 1]) : undefined // another shim, as in measure.js
const stack = await startStack({ staticDir })
try {
  await withTabs({ base: stack.gateway.url, user: userNamer('trace')('closed'), n: N, initScript: instrument, focus }, async ({ pages, li }) => {
    const shape = { chunks: 60, delayMs: 80 }
    await startAll(pages, 'closed', shape)
    await underWay(pages, 'closed', 8)
    await Promise.all(pages.map(p => p.evaluate(() => { window.__trace.length = 0 })))
    const t0 = Date.now()
    await pages[li].close({ runBeforeUnload: true })
    const rest = pages.filter((_, i) => i !== li)
    await sleep(3000)
    const traces = await Promise.all(rest.map(p => p.evaluate(() => window.__trace)))
    const runs = await Promise.all(rest.map(p => readRun(p, 'closed')))
    report(traces, runs, t0)
  })
} finally {
  await stack.stop()
}

/** Prints the new leader's timeline, then when the survivors heard what, and their pauses. */
function report (traces, runs, t0) {
  // the tab granted the lock leads; another tab may have opened a warm socket too
  let who = traces.findIndex(tr => tr.some(([t, w]) => w === 'lock:granted' && t >= t0))
  if (who < 0) who = traces.findIndex(tr => tr.some(([, w]) => w === 'ws:new'))
  const rel = t => Math.round(t - t0)
  console.log(`new leader: survivor ${who}`)
  const at = (tr, what) => tr.find(([t, w]) => w === what && t >= t0)?.[0]
  const opened = at(traces[who], 'ws:new')
  const open = at(traces[who], 'ws:open')
  if (opened !== undefined && open !== undefined) console.log(`its WebSocket handshake took ${Math.round(open - opened)} ms`)
  const others = traces.map((tr, i) => [i, tr.filter(([t, w]) => w === 'ws:new' && t >= t0).length]).filter(([i, n]) => i !== who && n > 0)
  if (others.length) console.log('other survivors that opened a WebSocket:', others.map(([i, n]) => `${i} (${n})`).join(' '))
  for (const [t, w, x] of traces[who]) {
    if (t - t0 >= 1500 || w === 'bus:join') continue
    if (x && x.at) x.at = rel(x.at)
    console.log(String(rel(t)).padStart(6), w, x ? JSON.stringify(x) : '')
  }
  console.log('joins read', traces[who].filter(([, w]) => w === 'bus:join').map(([t]) => rel(t)).join(' '))
  const firstOf = (tr, what) => { const e = tr.find(([, w]) => w === what); return e ? rel(e[0]) : null }
  const col = what => traces.map(tr => firstOf(tr, what)).filter(x => x !== null).sort((a, b) => a - b)
  const pct = xs => xs.length ? `min ${xs[0]} med ${xs[xs.length >> 1]} max ${xs[xs.length - 1]} (n ${xs.length})` : '-'
  console.log('resign read by followers:', pct(col('bus:resign')))
  console.log('claim read by followers: ', pct(col('bus:claim')))
  console.log('first frames after close:', pct(traces.map(tr => tr.find(([t, w]) => w === 'bus:frames' && t > t0)).filter(Boolean).map(e => rel(e[0])).sort((a, b) => a - b)))
  const gaps = runs.map(r => (r.maxGapAt !== null && r.maxGapAt >= t0 ? Math.round(r.maxGapMs) : 0)).sort((a, b) => a - b)
  console.log('pause per survivor:', gaps.join(' '))
  console.log('pause ends (rel):', runs.map(r => (r.maxGapAt >= t0 ? rel(r.maxGapAt) : null)).filter(x => x !== null).sort((a, b) => a - b).join(' '))
  console.log('long tasks in survivors after close:', traces.flatMap(tr => tr.filter(([t, w]) => w === 'longtask' && t > t0)).length)
}
