// Many tabs of one browser context, one WebSocket: the shim against the real gateway and its
// mock upstream, in Debian's headless Chromium. See harness.js for what each helper does.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import {
  assertExact, expectedText, freezePage, maxConcurrent, mockPrompt, sleep, startAll, startProxy,
  startStack, statuses, streamsOverlapping, underWay, userNamer, waitFor, waitRuns, waitShared,
  withTabs,
} from './harness.js'

const TABS = 12
const T = { timeout: 120_000 }
let stack

before(async () => { stack = await startStack() })
after(async () => { await stack?.stop() })

const newUser = userNamer('e2e')

test('1. twelve tabs stream at once over ONE WebSocket, each with its exact text', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('twelve'), n: TABS }, async ({ pages, status, user }) => {
    const tabIds = status.map(s => s.tabId)
    const shape = { chunks: 30, delayMs: 100, stallMs: 150 }
    const prompts = await startAll(pages, 'one', shape)
    const runs = await waitRuns(pages, 'one')
    assertExact(runs, prompts, shape.chunks, pages.keys())
    runs.forEach((r, i) => assert.ok(r.id.startsWith(`${tabIds[i]}:`), `stream id ${r.id} carries its tab id`))
    assert.equal(maxConcurrent(runs), TABS, 'all twelve streams were receiving at the same time')
    assert.equal(streamsOverlapping(runs, TABS - 1), TABS)
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections_total, 1, `the gateway saw ${stats.connections_total} WebSockets for ${user}`)
    assert.equal(stats.connections, 1)
    assert.equal(stats.live_streams, 0)
    const usage = runs[0].result
    assert.equal(usage.finish_reason, 'stop')
    assert.equal(usage.usage.completion_tokens, shape.chunks)
  })
})

test('3. closing the leader tab mid-stream: the others finish exact, a new leader takes over', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('leader-closes'), n: TABS }, async ({ pages, li, user }) => {
    const shape = { chunks: 60, delayMs: 80 }
    const prompts = await startAll(pages, 'handover', shape)
    await underWay(pages, 'handover', 5)
    await pages[li].close({ runBeforeUnload: true })
    const rest = pages.filter((_, i) => i !== li)
    const runs = await waitRuns(rest, 'handover')
    const restPrompts = prompts.filter((_, i) => i !== li)
    assertExact(runs, restPrompts, shape.chunks, rest.keys())
    const s = await waitShared(rest, 'a new leader shared by the 11 remaining tabs')
    assert.equal(s.filter(x => x.role === 'leader').length, 1)
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections, 1, 'one socket open after the handover')
    assert.equal(stats.connections_total, 2, 'the old leader\'s socket, then the new leader\'s')
  })
})

test('4. closing a follower tab mid-stream aborts its upstream request', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('follower-closes'), n: TABS }, async ({ pages, li }) => {
    const fi = (li + 5) % TABS
    const shape = { chunks: 50, delayMs: 80 }
    const prompts = await startAll(pages, 'bye', shape)
    await underWay(pages, 'bye', 3)
    const before = await stack.mock.stats()
    await pages[fi].close({ runBeforeUnload: true })
    await waitFor(async () => (await stack.mock.stats()).aborted > before.aborted, { timeoutMs: 10_000, what: 'the mock to see an aborted request' })
    const rest = pages.filter((_, i) => i !== fi)
    const runs = await waitRuns(rest, 'bye')
    assertExact(runs, prompts.filter((_, i) => i !== fi), shape.chunks, rest.keys())
    const afterStats = await stack.mock.stats()
    assert.equal(afterStats.aborted, before.aborted + 1, 'exactly the closed tab\'s request was aborted')
    await waitFor(async () => (await statuses(rest)).every(s => s.tabs === TABS - 1), { what: 'the roster to shrink to 11' })
  })
})

test('4b. a follower that stops answering is dropped by heartbeat and its upstream aborted', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('follower-hangs'), n: TABS }, async ({ context, pages, li }) => {
    const fi = (li + 3) % TABS
    const shape = { chunks: 120, delayMs: 60 }
    const prompts = await startAll(pages, 'hang', shape)
    await underWay(pages, 'hang', 3)
    const before = await stack.mock.stats()
    // no pagehide, no bye: the tab just stops (as a hung or crashed renderer would)
    const hang = await freezePage(context, pages[fi])
    try {
      await waitFor(async () => (await stack.mock.stats()).aborted > before.aborted, { timeoutMs: 15_000, what: 'the leader to drop the silent tab and abort its request' })
      const rest = pages.filter((_, i) => i !== fi)
      await waitFor(async () => (await statuses(rest)).every(s => s.tabs === TABS - 1), { what: 'the roster to shrink to 11' })
      const runs = await waitRuns(rest, 'hang')
      assertExact(runs, prompts.filter((_, i) => i !== fi), shape.chunks, rest.keys())
      assert.equal((await stack.mock.stats()).aborted, before.aborted + 1)
    } finally {
      await hang.thaw()
    }
    // back, the tab learns why its stream stopped, and rejoins
    const [run] = await waitRuns([pages[fi]], 'hang', { timeoutMs: 15_000 })
    assert.equal(run.error?.code, 'tab_gone')
    await waitShared(pages, 'the tab to rejoin after it came back')
  })
})

test('5a. the leader\'s socket is cut mid-stream: tabs reconnect and resume with exact text', T, async () => {
  const proxy = await startProxy(stack.gateway.port)
  try {
    await withTabs({ base: proxy.url, user: newUser('cut'), n: TABS }, async ({ pages, user }) => {
      const shape = { chunks: 60, delayMs: 80 }
      const prompts = await startAll(pages, 'cut', shape)
      await underWay(pages, 'cut', 5)
      assert.equal((await stack.gateway.admin(user)).connections_total, 1)
      proxy.cut()
      const runs = await waitRuns(pages, 'cut')
      assertExact(runs, prompts, shape.chunks, pages.keys())
      const stats = await stack.gateway.admin(user)
      assert.equal(stats.connections_total, 2, 'one reconnect after the cut')
      assert.equal(stats.connections, 1)
    })
  } finally { await proxy.close() }
})

test('5b. the gateway restarts mid-stream: those streams end with a clear error, new ones work', T, async (t) => {
  await withTabs({ base: stack.gateway.url, user: newUser('restart'), n: TABS }, async ({ pages, user }) => {
    // far longer than the gateway's drain (2 s): the restart must cut them off
    const shape = { chunks: 400, delayMs: 50 }
    await startAll(pages, 'doomed', shape)
    await underWay(pages, 'doomed', 3)
    const restart = stack.restartGateway('SIGTERM')
    const runs = await waitRuns(pages, 'doomed', { timeoutMs: 45_000 })
    t.diagnostic(`errors seen: ${[...new Set(runs.map(r => r.error && `${r.error.code}: ${r.error.message}`))].join(' | ')}`)
    for (const [i, run] of runs.entries()) {
      assert.ok(run.error, `tab ${i}: stream should have failed, got ${run.deltas} deltas and no error`)
      assert.ok(['internal', 'not_found'].includes(run.error.code), `tab ${i}: code ${run.error.code}`)
      assert.ok(run.error.message.length > 10, `tab ${i}: a message a person can read: ${run.error.message}`)
      assert.ok(run.deltas >= 3 && run.deltas < shape.chunks)
      const full = expectedText(mockPrompt(`doomed tab ${i}: tell me something`, shape), shape.chunks)
      assert.ok(full.startsWith(run.text), `tab ${i}: what did arrive is exact, no gap, no duplicate`)
    }
    await restart
    await waitShared(pages, 'the tabs to reconnect to the restarted gateway')
    const again = { chunks: 12, delayMs: 20 }
    const prompts = await startAll(pages, 'again', again)
    const more = await waitRuns(pages, 'again')
    assertExact(more, prompts, again.chunks, pages.keys())
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections_total, 1, 'one socket to the new process')
  })
})

test('6. fallback without BroadcastChannel: every tab streams on its own socket', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('fallback'), n: TABS, initScript: () => { delete window.BroadcastChannel }, shared: false }, async ({ pages, user }) => {
    const s = await statuses(pages)
    assert.deepEqual(s.map(x => x.role), Array(TABS).fill('solo'))
    const shape = { chunks: 20, delayMs: 30 }
    const prompts = await startAll(pages, 'solo', shape)
    const runs = await waitRuns(pages, 'solo')
    assertExact(runs, prompts, shape.chunks, pages.keys())
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections_total, TABS, 'one socket per tab')
  })
})

test('7. a frozen leader is replaced and the other tabs\' streams finish', T, async (t) => {
  await withTabs({ base: stack.gateway.url, user: newUser('frozen'), n: TABS }, async ({ context, pages, li }) => {
    const shape = { chunks: 80, delayMs: 80 }
    const prompts = await startAll(pages, 'frozen', shape, new Set([li]))
    const rest = pages.filter((_, i) => i !== li)
    await underWay(rest, 'frozen', 3)
    const freeze = await freezePage(context, pages[li])
    t.diagnostic(freeze.frozenByLifecycle
      ? 'leader frozen by Page.setWebLifecycleState'
      : 'Page.setWebLifecycleState left the page running; leader stopped with Debugger.pause instead')
    try {
      const newLeader = await waitFor(async () => {
        const s = await statuses(rest)
        return s.filter(x => x.role === 'leader').length === 1 && s.every(x => x.connection === 'open') && s
      }, { what: 'a follower to take over from the frozen leader' })
      assert.equal(newLeader.filter(x => x.role === 'follower').length, TABS - 2)
      const runs = await waitRuns(rest, 'frozen')
      assertExact(runs, prompts.filter((_, i) => i !== li), shape.chunks, rest.keys())
    } finally {
      await freeze.thaw()
    }
    // thawed, the old leader learns its lock was taken and follows
    await waitShared(pages, 'the thawed tab to rejoin as a follower')
    assert.equal((await statuses([pages[li]]))[0].role, 'follower')
    await sleep(100)
  })
})
