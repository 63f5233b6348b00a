// Issue 10's figures, measured in real Chromium against the real gateway (timings belong here,
// not in the tests). Prints one JSON line per run and a summary (median, min–max) per figure.
//
//   node e2e/measure.js [--scenario closed,crashed,fallback,cpu] [--repeat 3] [--static DIR] [--standby]
//                       [--all-focused]
//
// Only the last tab opened has the focus, as the one foreground tab of a real browser window
// (harness.js oneForeground); --all-focused keeps Playwright's default, where every page acts
// focused (so every tab's focused prompt paints its blinking caret): how the figures before
// web/README.md's "One foreground tab, a spread heartbeat, joins put off" were taken. Report both.
//
// --standby turns the shim's standby connection on (option `standby`, off by default) in the
// closed and crashed scenarios.
//
// --static serves another copy of web/ (e.g. an older shim: see web/README.md) so that the
// before and after figures come from the same machine in the same session.
import fs from 'node:fs'
import path from 'node:path'
import {
  crashPage, expectedText, fallbackCountingSockets, readRun, sleep, startAll, startStack, underWay,
  userNamer, withTabs,
} from './harness.js'

const args = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? args[i + 1] : dflt
}
const scenarios = opt('scenario', 'closed,crashed,fallback,cpu').split(',')
const repeat = Number(opt('repeat', '3'))
const standby = args.includes('--standby')
const focus = args.includes('--all-focused') ? 'all' : 'one'
const staticDir = opt('static', undefined) && path.resolve(opt('static'))
if (staticDir && !fs.existsSync(path.join(staticDir, 'src', 'mux.js'))) throw new Error(`no shim in ${staticDir}/src`)

const newUser = userNamer('measure')
const median = xs => { const s = [...xs].sort((a, b) => a - b); return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN }

/** Waits (bounded) for every page's run `key` to end; returns the runs as they are then. */
async function runsWithin (pages, key, timeoutMs) {
  const end = Date.now() + timeoutMs
  for (;;) {
    const runs = await Promise.all(pages.map(p => readRun(p, key)))
    if (runs.every(r => r && r.ended) || Date.now() > end) return runs
    await sleep(250)
  }
}

const exactCount = (runs, prompts, chunks) => runs.filter((r, i) => r && !r.error && r.text === expectedText(prompts[i], chunks)).length

/** Records every status change of every page (time, role) in window.__roles. */
function recordRoles (pages) {
  return Promise.all(pages.map(p => p.evaluate(() => {
    window.__roles = []
    const now = () => performance.timeOrigin + performance.now()
    window.muxgateDemo.mux.on('status', s => {
      const last = window.__roles.at(-1)
      if (!last || last[1] !== s.role) window.__roles.push([now(), s.role])
    })
  })))
}

/**
 * From each tab's role log: when, after `t0`, the set of leaders last changed (it must end as
 * exactly one leader), and how many distinct tabs were leader at some point after `t0`.
 */
function leaderSettle (logs, t0) {
  const events = []
  logs.forEach((log, tab) => { for (const [t, role] of log) if (t >= t0) events.push([t, tab, role]) })
  events.sort((a, b) => a[0] - b[0])
  const role = logs.map(log => { const before = log.filter(([t]) => t < t0).at(-1); return before ? before[1] : null })
  const leaders = new Set(role.map((r, i) => r === 'leader' ? i : -1).filter(i => i >= 0))
  const ever = new Set()
  let settledAt = t0
  for (const [t, tab, r] of events) {
    const was = leaders.has(tab)
    if (r === 'leader') { leaders.add(tab); ever.add(tab) } else leaders.delete(tab)
    if (was !== leaders.has(tab)) settledAt = t
  }
  return { settleMs: Math.round(settledAt - t0), leadersNow: leaders.size, tabsThatLed: ever.size }
}

async function closed (stack) {
  const N = 30
  return withTabs({ base: stack.gateway.url, user: newUser('closed'), n: N, standby, focus }, async ({ pages, li, user }) => {
    const shape = { chunks: 60, delayMs: 80 }
    const prompts = await startAll(pages, 'closed', shape)
    await underWay(pages, 'closed', 8)
    // with the standby, the next leader's connection is open before the close
    const before = (await stack.gateway.admin(user)).connections_total
    const t0 = Date.now()
    await pages[li].close({ runBeforeUnload: true })
    const rest = pages.filter((_, i) => i !== li)
    const runs = await runsWithin(rest, 'closed', 60_000)
    const restPrompts = prompts.filter((_, i) => i !== li)
    // the pause the handover caused: the longest gap between two chunks that ends after the close
    const gaps = runs.map(r => (r.maxGapAt !== null && r.maxGapAt >= t0 ? r.maxGapMs : 0))
    const stats = await stack.gateway.admin(user)
    return {
      tabs: N, chunkEveryMs: shape.delayMs,
      longestPauseMs: Math.round(Math.max(...gaps)),
      medianPauseMs: Math.round(median(gaps)),
      exact: exactCount(runs, restPrompts, shape.chunks), of: rest.length,
      socketsOpenedByHandover: stats.connections_total - before,
    }
  })
}

async function crashed (stack) {
  const N = 30
  return withTabs({ base: stack.gateway.url, user: newUser('crashed'), n: N, standby, focus }, async ({ context, pages, li, user }) => {
    const shape = { chunks: 80, delayMs: 80 }
    const prompts = await startAll(pages, 'crashed', shape, new Set([li]))
    const rest = pages.filter((_, i) => i !== li)
    await underWay(rest, 'crashed', 5)
    await recordRoles(rest)
    const before = (await stack.gateway.admin(user)).connections_total
    const t0 = Date.now()
    await crashPage(context, pages[li])
    const runs = await runsWithin(rest, 'crashed', 60_000)
    await sleep(3000) // late steals would show up here
    const logs = await Promise.all(rest.map(p => p.evaluate(() => window.__roles)))
    const settle = leaderSettle(logs, t0)
    const stats = await stack.gateway.admin(user)
    return {
      tabs: N,
      oneLeaderAfterMs: settle.leadersNow === 1 ? settle.settleMs : null,
      leadersNow: settle.leadersNow,
      tabsThatLed: settle.tabsThatLed,
      socketsOpenedByHandover: stats.connections_total - before,
      exact: exactCount(runs, prompts.filter((_, i) => i !== li), shape.chunks), of: rest.length,
    }
  })
}

async function fallback (stack) {
  const N = 20
  return withTabs({ base: stack.gateway.url, user: newUser('fallback'), n: N, initScript: fallbackCountingSockets, shared: false, focus }, async ({ pages }) => {
    const shape = { chunks: 30, delayMs: 60 }
    const t0 = Date.now()
    const prompts = await startAll(pages, 'fallback', shape)
    const runs = await runsWithin(pages, 'fallback', 20_000)
    const errors = runs.filter(r => r && r.error)
    const sockets = (await Promise.all(pages.map(p => p.evaluate(() => window.__sockets)))).reduce((a, b) => a + b, 0)
    return {
      tabs: N,
      exact: exactCount(runs, prompts, shape.chunks),
      errors: errors.length,
      errorCodes: [...new Set(errors.map(r => r.error.code))],
      slowestErrorMs: errors.length ? Math.round(Math.max(...errors.map(r => r.endAt - t0))) : null,
      hungWithin20s: runs.filter(r => r && !r.ended).length,
      socketsOpened: sockets,
    }
  })
}

async function cpuAt (stack, N) {
  return withTabs({ base: stack.gateway.url, user: newUser(`cpu${N}`), n: N, focus }, async ({ context, pages, li }) => {
    const cdps = await Promise.all(pages.map(async p => { const c = await context.newCDPSession(p); await c.send('Performance.enable'); return c }))
    // TaskDuration: wall time of the renderers' main-thread tasks (the issue's figure);
    // ThreadTime: their main threads' CPU time, less swollen when 30 renderers share 2 cores
    const taskSeconds = async () => {
      const all = await Promise.all(cdps.map(c => c.send('Performance.getMetrics')))
      const of = (m, name) => m.metrics.find(x => x.name === name)?.value ?? 0
      const sum = name => all.map(m => of(m, name)).reduce((a, b) => a + b, 0)
      return { task: sum('TaskDuration'), thread: sum('ThreadTime'), leaderTask: of(all[li], 'TaskDuration'), at: performance.now() }
    }
    await sleep(1000)
    // the tabs idle (heartbeats, acks, timers): what they cost per second regardless of chunks
    const idle0 = await taskSeconds()
    await sleep(2000)
    const idle1 = await taskSeconds()
    const idleTaskPerS = (idle1.task - idle0.task) / ((idle1.at - idle0.at) / 1000)
    const shape = { chunks: 100, delayMs: 50 }
    const before = await taskSeconds()
    await startAll(pages, 'cpu', shape)
    const runs = await runsWithin(pages, 'cpu', 60_000)
    const after = await taskSeconds()
    const chunks = runs.reduce((a, r) => a + (r?.deltas ?? 0), 0)
    await Promise.all(cdps.map(c => c.detach().catch(() => {})))
    const task = after.task - before.task
    const leaderTask = after.leaderTask - before.leaderTask
    return {
      tabs: N, chunks,
      taskMs: Math.round(task * 1000),
      taskUsPerChunk: Math.round(task * 1e6 / chunks),
      threadUsPerChunk: Math.round((after.thread - before.thread) * 1e6 / chunks),
      // where it goes: the leader's tasks, the followers', and the idle rate over the run
      leaderUsPerChunk: Math.round(leaderTask * 1e6 / chunks),
      followersUsPerChunk: Math.round((task - leaderTask) * 1e6 / chunks),
      periodicUsPerChunk: Math.round(idleTaskPerS * ((after.at - before.at) / 1000) * 1e6 / chunks),
    }
  })
}

async function cpu (stack) {
  const six = await cpuAt(stack, 6)
  const thirty = await cpuAt(stack, 30)
  return {
    usPerChunk6: six.taskUsPerChunk,
    usPerChunk30: thirty.taskUsPerChunk,
    ratio30to6: Number((thirty.taskUsPerChunk / six.taskUsPerChunk).toFixed(2)),
    cpuUsPerChunk6: six.threadUsPerChunk,
    cpuUsPerChunk30: thirty.threadUsPerChunk,
    cpuRatio30to6: Number((thirty.threadUsPerChunk / six.threadUsPerChunk).toFixed(2)),
    leaderUsPerChunk6: six.leaderUsPerChunk,
    leaderUsPerChunk30: thirty.leaderUsPerChunk,
    followersUsPerChunk6: six.followersUsPerChunk,
    followersUsPerChunk30: thirty.followersUsPerChunk,
    periodicUsPerChunk6: six.periodicUsPerChunk,
    periodicUsPerChunk30: thirty.periodicUsPerChunk,
    six,
    thirty,
  }
}

const RUN = { closed, crashed, fallback, cpu }
const stack = await startStack({ staticDir })
const results = {}
try {
  for (const name of scenarios) {
    results[name] = []
    for (let k = 0; k < repeat; k++) {
      const r = await RUN[name](stack)
      results[name].push(r)
      console.log(JSON.stringify({ scenario: name, shim: staticDir ?? 'web/', focus, run: k + 1, ...r }))
    }
  }
} finally { await stack.stop() }

const summary = {}
for (const [name, runs] of Object.entries(results)) {
  summary[name] = {}
  for (const key of Object.keys(runs[0])) {
    const xs = runs.map(r => r[key])
    if (xs.every(x => typeof x === 'number')) summary[name][key] = { median: median(xs), min: Math.min(...xs), max: Math.max(...xs) }
  }
}
console.log(JSON.stringify({ summary, shim: staticDir ?? 'web/', focus, repeat }, null, 1))
