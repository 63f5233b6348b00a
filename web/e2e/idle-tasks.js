// What the tabs' main threads run when no stream is open (issue 10, the idle share of
// TaskDuration): N tabs of the demo, Chromium tracing for a few seconds, each renderer's main
// thread tasks grouped by their first traced event (PrePaint: a frame; Receive mojo message:
// a BroadcastChannel message; TimerFire: a timer). Counted and timed per tab; the wall times
// swell with the machine's load, the counts do not.
//
//   node e2e/idle-tasks.js [--tabs 30] [--seconds 5] [--static DIR] [--blur] [--all-focused]
//
// By default only the last tab has the focus, as the one foreground tab of a real browser
// (harness.js oneForeground); --all-focused keeps Playwright's focus emulation in every page
// (every tab acts focused: how this was measured before).
//
// --blur takes the focus from the demo's prompt before tracing: a diagnostic, not how the
// demo is measured (its focused textarea's caret is what paints every 500 ms).
import path from 'node:path'
import { sleep, startStack, userNamer, withTabs } from './harness.js'

const args = process.argv.slice(2)
const opt = (name, dflt) => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : dflt }
const N = Number(opt('tabs', '30'))
const seconds = Number(opt('seconds', '5'))
const staticDir = opt('static', undefined) && path.resolve(opt('static'))
const blur = args.includes('--blur')
const focus = args.includes('--all-focused') ? 'all' : 'one'

const stack = await startStack({ staticDir })
try {
  await withTabs({ base: stack.gateway.url, user: userNamer('idle')('tasks'), n: N, focus }, async ({ context, pages, li }) => {
    const focused = (await Promise.all(pages.map(p => p.evaluate(() => document.hasFocus())))).filter(Boolean).length
    if (blur) await Promise.all(pages.map(p => p.evaluate(() => document.activeElement?.blur())))
    const leaderTab = await pages[li].evaluate(() => window.muxgateDemo.mux.tabId)
    const cdp = await context.newCDPSession(pages[li === 0 ? 1 : 0])
    await sleep(1500)
    const events = []
    cdp.on('Tracing.dataCollected', d => events.push(...d.value))
    const done = new Promise(resolve => cdp.once('Tracing.tracingComplete', resolve))
    await cdp.send('Tracing.start', { traceConfig: { includedCategories: ['toplevel', 'devtools.timeline', 'disabled-by-default-devtools.timeline'] }, transferMode: 'ReportEvents' })
    await sleep(seconds * 1000)
    await cdp.send('Tracing.end')
    await done
    const key = e => `${e.pid}:${e.tid}`
    const mains = new Set(events.filter(e => e.ph === 'M' && e.name === 'thread_name' && e.args.name === 'CrRendererMain').map(key))
    const byThread = new Map()
    for (const e of events) {
      if (!mains.has(key(e)) || e.ph !== 'X') continue
      if (!byThread.has(key(e))) byThread.set(key(e), { tasks: [], inner: [] })
      const t = byThread.get(key(e))
      if (e.name === 'RunTask') t.tasks.push(e)
      else if (e.name !== 'ThreadControllerImpl::RunTask') t.inner.push(e)
    }
    const rows = []
    for (const [thread, { tasks, inner }] of byThread) {
      inner.sort((a, b) => a.ts - b.ts)
      const kinds = {}
      for (const t of tasks) {
        const first = inner.find(e => e.ts >= t.ts && e.ts < t.ts + t.dur)
        const kind = first ? first.name : '(none)'
        const k = (kinds[kind] ??= { n: 0, wallMs: 0, cpuMs: 0 })
        k.n++
        k.wallMs += t.dur / 1000
        k.cpuMs += (t.tdur ?? 0) / 1000
      }
      const timers = kinds.TimerFire?.n ?? 0
      const received = kinds['Receive mojo message']?.n ?? 0
      const messageStarts = tasks.filter(t => inner.find(e => e.ts >= t.ts && e.ts < t.ts + t.dur)?.name === 'Receive mojo message').map(t => t.ts)
      rows.push({ thread, tasks: tasks.length, received, timers, kinds, messageStarts })
    }
    // the leader is the tab that receives the followers' acks: the most messages
    rows.sort((a, b) => b.received - a.received)
    const per = x => Number((x / seconds).toFixed(2))
    const round = k => Object.fromEntries(Object.entries(k).map(([n, v]) => [n, { perS: per(v.n), wallMsPerS: per(v.wallMs), cpuMsPerS: per(v.cpuMs) }]))
    const [leader, ...followers] = rows
    const mean = f => followers.length ? followers.reduce((a, r) => a + f(r), 0) / followers.length : 0
    // how synchronised the followers' wake-ups are: for each follower's message task, how many
    // other followers started one within 5 ms of it (one broadcast heartbeat: all the others)
    const starts = followers.flatMap((r, i) => r.messageStarts.map(ts => [ts, i])).sort((a, b) => a[0] - b[0])
    let together = 0
    for (let a = 0, lo = 0; a < starts.length; a++) {
      while (starts[lo][0] < starts[a][0] - 5000) lo++
      const near = new Set()
      for (let b = lo; b < starts.length && starts[b][0] <= starts[a][0] + 5000; b++) if (starts[b][1] !== starts[a][1]) near.add(starts[b][1])
      together += near.size
    }
    console.log(JSON.stringify({
      tabs: N, seconds, shim: staticDir ?? 'web/', blur, focus, focused, leaderTab, renderers: rows.length,
      leader: { tasksPerS: per(leader.tasks), kinds: round(leader.kinds) },
      followerMean: {
        tasksPerS: per(mean(r => r.tasks)),
        paintsPerS: per(mean(r => r.kinds.PrePaint?.n ?? 0)),
        messagesPerS: per(mean(r => r.received)),
        timersPerS: per(mean(r => r.timers)),
        othersWokenWithin5ms: starts.length ? Number((together / starts.length).toFixed(1)) : 0,
        wallMsPerS: per(mean(r => Object.values(r.kinds).reduce((a, k) => a + k.wallMs, 0))),
        cpuMsPerS: per(mean(r => Object.values(r.kinds).reduce((a, k) => a + k.cpuMs, 0))),
      },
    }, null, 1))
  })
} finally { await stack.stop() }
