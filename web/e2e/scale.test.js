// Thirty tabs of one user in one Chromium, and the faults of issue 10: the leader closed, the
// leader's renderer crashed, a follower's renderer crashed; and fallback mode (no
// BroadcastChannel) with 20 tabs against the gateway's cap of 16 sockets per user. These
// assert correctness (exact text, one leader, socket bounds, clear errors); the timing figures
// are measured by e2e/measure.js.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import {
  assertExact, crashPage, fallbackCountingSockets, socketsOpened, startAll, startStack, statuses,
  underWay, userNamer, waitFor, waitRuns, waitShared, withTabs,
} from './harness.js'

const TABS = 30
const T = { timeout: 240_000 }
let stack

before(async () => { stack = await startStack() })
after(async () => { await stack?.stop() })

const newUser = userNamer('e2e30')

test('30 tabs: closing the leader mid-stream, the 29 others finish exact on ONE new socket', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('leader-closes'), n: TABS }, async ({ pages, li, user }) => {
    const shape = { chunks: 60, delayMs: 80 }
    const prompts = await startAll(pages, 'handover', shape)
    await underWay(pages, 'handover', 5)
    await pages[li].close({ runBeforeUnload: true })
    const rest = pages.filter((_, i) => i !== li)
    const runs = await waitRuns(rest, 'handover')
    assertExact(runs, prompts.filter((_, i) => i !== li), shape.chunks, rest.keys())
    await waitShared(rest, 'a new leader shared by the 29 remaining tabs')
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections, 1, 'one socket open after the handover')
    assert.equal(stats.connections_total, 2, 'the old leader\'s socket, then the new leader\'s: one hello resumed all')
  })
})

test('30 tabs with the standby connection: closing the leader mid-stream, the next leader resumes on its standby (no new socket), the 29 others exact', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('standby-closes'), n: TABS, standby: true }, async ({ pages, li, user }) => {
    const shape = { chunks: 60, delayMs: 80 }
    const prompts = await startAll(pages, 'standby', shape)
    await underWay(pages, 'standby', 5)
    await waitFor(async () => (await stack.gateway.admin(user)).connections === 2, { what: 'the leader and the next one\'s standby' })
    assert.equal((await stack.gateway.admin(user)).connections_total, 2)
    await pages[li].close({ runBeforeUnload: true })
    const rest = pages.filter((_, i) => i !== li)
    const runs = await waitRuns(rest, 'standby')
    assertExact(runs, prompts.filter((_, i) => i !== li), shape.chunks, rest.keys())
    await waitShared(rest, 'a new leader shared by the 29 remaining tabs')
    await waitFor(async () => (await stack.gateway.admin(user)).connections === 2, { what: 'the new leader and the new head\'s standby' })
    const stats = await stack.gateway.admin(user)
    assert.equal(stats.connections_total, 3, 'the old leader, the standby it handed over on, the new head\'s standby: no socket for the handover itself')
  })
})

test('30 tabs: the leader\'s renderer crashes (Page.crash): one new leader, at most 3 sockets, text exact', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('leader-crashes'), n: TABS }, async ({ context, pages, li, user }) => {
    const shape = { chunks: 80, delayMs: 80 }
    const prompts = await startAll(pages, 'crash', shape, new Set([li]))
    const rest = pages.filter((_, i) => i !== li)
    await underWay(rest, 'crash', 5)
    const before = (await stack.gateway.admin(user)).connections_total
    await crashPage(context, pages[li])
    const runs = await waitRuns(rest, 'crash')
    assertExact(runs, prompts.filter((_, i) => i !== li), shape.chunks, rest.keys())
    const s = await waitShared(rest, 'one leader shared by the 29 survivors')
    assert.equal(s.filter(x => x.role === 'leader').length, 1)
    const stats = await stack.gateway.admin(user)
    const opened = stats.connections_total - before
    assert.ok(opened >= 1 && opened <= 3, `the handover opened ${opened} sockets`)
    assert.equal(stats.connections, 1)
    // and it stays settled: no late steal
    await new Promise(r => setTimeout(r, 3000))
    const later = await statuses(rest)
    assert.equal(later.filter(x => x.role === 'leader').length, 1)
    assert.equal((await stack.gateway.admin(user)).connections_total, stats.connections_total, 'no socket after settling')
  })
})

test('30 tabs: a follower\'s renderer crashes: its upstream request is aborted, the others finish exact', T, async () => {
  await withTabs({ base: stack.gateway.url, user: newUser('follower-crashes'), n: TABS }, async ({ context, pages, li, user }) => {
    const fi = (li + 7) % TABS
    const shape = { chunks: 100, delayMs: 60 }
    const prompts = await startAll(pages, 'fcrash', shape)
    await underWay(pages, 'fcrash', 3)
    const before = await stack.mock.stats()
    await crashPage(context, pages[fi])
    await waitFor(async () => (await stack.mock.stats()).aborted > before.aborted, { timeoutMs: 15_000, what: 'the leader to drop the crashed tab and abort its request' })
    const rest = pages.filter((_, i) => i !== fi)
    const runs = await waitRuns(rest, 'fcrash')
    assertExact(runs, prompts.filter((_, i) => i !== fi), shape.chunks, rest.keys())
    assert.equal((await stack.mock.stats()).aborted, before.aborted + 1, 'exactly the crashed tab\'s request was aborted')
    await waitFor(async () => (await statuses(rest)).every(s => s.tabs === TABS - 1), { what: 'the roster to shrink to 29' })
    assert.equal((await stack.gateway.admin(user)).connections_total, 1, 'the leader kept its socket')
  })
})

test('fallback, 20 tabs of one user over the cap of 16: 16 exact, 4 clear errors at once, no retry storm', T, async () => {
  const N = 20
  const CAP = 16 // the gateway's default `max_connections` per user (src/limits.rs)
  await withTabs({ base: stack.gateway.url, user: newUser('fallback-cap'), n: N, initScript: fallbackCountingSockets, shared: false }, async ({ pages, user }) => {
    assert.deepEqual((await statuses(pages)).map(x => x.role), Array(N).fill('solo'))
    const shape = { chunks: 30, delayMs: 60 }
    const prompts = await startAll(pages, 'cap', shape)
    const runs = await waitRuns(pages, 'cap', { timeoutMs: 30_000 })
    const ok = [...runs.keys()].filter(i => !runs[i].error)
    const refused = [...runs.keys()].filter(i => runs[i].error)
    assert.equal(ok.length, CAP, `${ok.length} tabs streamed`)
    assertExact(runs, prompts, shape.chunks, ok)
    assert.equal(refused.length, N - CAP)
    for (const i of refused) {
      const run = runs[i]
      assert.equal(run.error.code, 'too_many_connections', `tab ${i}: ${JSON.stringify(run.error)}`)
      assert.match(run.error.message, /16 simultaneous connections/)
      assert.equal(run.deltas, 0)
    }
    const opened = await socketsOpened(pages)
    assert.ok(opened <= N + 4, `${opened} sockets opened by ${N} tabs`)
    const stats = await stack.gateway.admin(user)
    assert.ok(stats.connections <= CAP)
  })
})
