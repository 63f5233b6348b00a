// Where a leader-closed handover's time goes at 30 tabs: one run, every tab instrumented by an
// init script (lock grants, bus messages read, the new socket's open, welcome and replay),
// printed as a timeline relative to the moment the leader's page was closed.
//
//   node e2e/trace-handover.js [--tabs 30] [--static DIR] [--all-focused] [--cpu]
//
// One foreground tab (the last opened) unless --all-focused, as in measure.js.
// --cpu: also traces every renderer's main thread (Chromium tracing) from the close until 1 s
// after it, and prints the tasks, frames (PrePaint) and CPU time (thread time, which the
// machine's load stretches far less than wall time) of the renderers in the 250 ms after the
// close, and the `status` events the survivors' pages heard in the second after it. The
// trace's collection stalls the renderers about 2 s after the close: with --cpu the pauses
// printed include that stall, read the handover's steps instead.
import path from 'node:path'
import { readRun, sleep, startAll, startStack, underWay, userNamer, withTabs } from './harness.js'

const args = process.argv.slice(2)
const N = Number(args[args.indexOf('--tabs') + 1] || 30) || 30
const focus = args.includes('--all-focused') ? 'all' : 'one'
const cpu = args.includes('--cpu')

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

    postMessage (data) {
      if (data?.t === 'join') note('post:join')
      return super.postMessage(data)
    }
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

/**
 * Times the shim's own steps of the handover in each page (the Mux methods a tab runs when it
 * hears the close, leads, or reads frames): each call over 2 ms is noted as `fn:<name>`, so a
 * long task can be split into the shim's part and the browser's.
 */
async function timeMethods () {
  const now = () => performance.timeOrigin + performance.now()
  const wrap = (proto, label, names) => {
    for (const name of names) {
      const fn = proto[name]
      if (typeof fn !== 'function' || fn.__timed) continue
      const timed = function (...a) {
        const start = now()
        try { return fn.apply(this, a) } finally {
          const took = now() - start
          if (took > 2) window.__trace.push([start, `fn:${label}.${name}`, { ms: Math.round(took), t: a[0]?.t }])
        }
      }
      timed.__timed = true
      proto[name] = timed
    }
  }
  window.muxgateDemo.mux.on('status', () => window.__trace.push([now(), 'status']))
  wrap(Object.getPrototypeOf(window.muxgateDemo.mux), 'mux', ['becomeLeader', 'noteResign', 'emit', 'onBus', 'deliverBatch', 'warmUp', 'setRole'])
  // the page's own module instances (same URLs as the shim's imports)
  const mods = await Promise.all(['leader', 'socket', 'router'].map(m => import(`/src/${m}.js`).catch(() => null)))
  if (mods[0]) wrap(mods[0].default.prototype, 'leader', ['start', 'adopt', 'onBus', 'finishCollecting', 'flushOutbox'])
  if (mods[1]) wrap(mods[1].default.prototype, 'socket', ['open', 'onMessage', 'connect'])
  if (mods[2]) wrap(mods[2].default.prototype, 'router', ['resumeList'])
}

const staticDir = args.includes('--static') ? path.resolve(args[args.indexOf('--static') + 1]) : undefined // another shim, as in measure.js
const stack = await startStack({ staticDir })
try {
  await withTabs({ base: stack.gateway.url, user: userNamer('trace')('closed'), n: N, initScript: instrument, focus }, async ({ context, pages, li }) => {
    const shape = { chunks: 60, delayMs: 80 }
    await startAll(pages, 'closed', shape)
    await underWay(pages, 'closed', 8)
    await Promise.all(pages.map(p => p.evaluate(timeMethods)))
    const rest = pages.filter((_, i) => i !== li)
    const tracer = cpu ? await startTracing(context, rest[0]) : null
    await Promise.all(pages.map(p => p.evaluate(() => { window.__trace.length = 0 })))
    const t0 = Date.now()
    // a mark in the trace at a known time of the pages' clock, to place the close in it
    const mark = tracer ? await rest[0].evaluate(() => { console.timeStamp('handover-mark'); return performance.timeOrigin + performance.now() }) : 0
    await pages[li].close({ runBeforeUnload: true })
    await sleep(tracer ? 1000 : 3000)
    const events = tracer ? await tracer.stop() : null
    if (tracer) await sleep(2000)
    const traces = await Promise.all(rest.map(p => p.evaluate(() => window.__trace)))
    const runs = await Promise.all(rest.map(p => readRun(p, 'closed')))
    report(traces, runs, t0)
    if (events) reportCpu(events, traces, t0, mark)
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
  console.log('joins posted by followers:', pct(traces.map(tr => tr.find(([t, w]) => w === 'post:join' && t > t0)).filter(Boolean).map(e => rel(e[0])).sort((a, b) => a - b)))
  const gone = traces.flatMap(tr => tr.filter(([, w]) => w === 'bus:resign').map(([, , x]) => x.from))[0]
  console.log('first replayed frames read:', pct(traces.map(tr => tr.find(([t, w, x]) => w === 'bus:frames' && t > t0 && x.from !== gone)).filter(Boolean).map(e => rel(e[0])).sort((a, b) => a - b)))
  const gaps = runs.map(r => (r.maxGapAt !== null && r.maxGapAt >= t0 ? Math.round(r.maxGapMs) : 0)).sort((a, b) => a - b)
  console.log('pause per survivor:', gaps.join(' '))
  console.log('pause ends (rel):', runs.map(r => (r.maxGapAt >= t0 ? rel(r.maxGapAt) : null)).filter(x => x !== null).sort((a, b) => a - b).join(' '))
  console.log('long tasks in survivors after close:', traces.flatMap(tr => tr.filter(([t, w]) => w === 'longtask' && t > t0)).length)
}

/** Chromium tracing of the renderers' main threads, from a CDP session on `page`. */
async function startTracing (context, page) {
  const cdp = await context.newCDPSession(page)
  const events = []
  cdp.on('Tracing.dataCollected', d => events.push(...d.value))
  const done = new Promise(resolve => cdp.once('Tracing.tracingComplete', resolve))
  await cdp.send('Tracing.start', { traceConfig: { includedCategories: ['toplevel', 'devtools.timeline', 'disabled-by-default-devtools.timeline'] }, transferMode: 'ReportEvents' })
  return {
    async stop () {
      await cdp.send('Tracing.end')
      await done
      await cdp.detach()
      return events
    },
  }
}

/**
 * The renderers' main-thread work in the 250 ms after the close (the pause's budget: what
 * competes with the handover for the cores), summed: tasks, frames (PrePaint) and thread time; and the
 * `status` events their pages heard in the second after the close. `mark` is the pages'
 * clock at the trace's `handover-mark` event, which places the close in the trace's clock.
 */
function reportCpu (events, traces, t0, mark) {
  const key = e => `${e.pid}:${e.tid}`
  const mains = new Set(events.filter(e => e.ph === 'M' && e.name === 'thread_name' && e.args.name === 'CrRendererMain').map(key))
  const stamp = events.find(e => e.name === 'TimeStamp' && e.args?.data?.message === 'handover-mark')
  if (!stamp) { console.log('cpu: the mark is not in the trace'); return }
  const ts = wall => stamp.ts + (wall - mark) * 1000
  // a fixed window, the pause's budget: the work that competes with the handover in it
  const until = t0 + 250
  const inWin = e => e.ts >= ts(t0) && e.ts < ts(until) && mains.has(key(e)) && e.ph === 'X'
  const tasks = events.filter(e => e.name === 'RunTask' && inWin(e))
  const frames = events.filter(e => e.name === 'PrePaint' && inWin(e))
  const cpuMs = tasks.reduce((a, e) => a + (e.tdur ?? 0), 0) / 1000
  const wallMs = tasks.reduce((a, e) => a + e.dur, 0) / 1000
  const statuses = traces.map(tr => tr.filter(([t, w]) => w === 'status' && t >= t0 && t < t0 + 1000).length)
  console.log(`cpu: in the ${Math.round(until - t0)} ms after the close: ${new Set(tasks.map(key)).size} renderers, ${tasks.length} tasks, ${frames.length} frames, ${cpuMs.toFixed(1)} ms thread time (${wallMs.toFixed(0)} ms wall)`)
  console.log(`status events per survivor in the second after the close: ${statuses.sort((a, b) => a - b).join(' ')}`)
  const one = traces[traces.length - 1].filter(([t, w]) => w === 'status' && t >= t0 && t < t0 + 1000).map(([t]) => Math.round(t - t0))
  console.log(`… in the last survivor, at: ${one.join(' ')}`)
}
