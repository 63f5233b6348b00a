// A rolling restart as a browser user lives it: two gateways in cluster mode on one Redis,
// behind a real nginx running the shipped deploy/nginx.conf, twelve tabs of one user sharing
// one socket through it. The instance holding that socket gets SIGTERM mid-stream: the leader
// gets `goaway`, reconnects through nginx (which now reaches only the other instance) and
// resumes every tab's stream there. One scenario: it is slow, and CI's time is bounded.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { assertExact, startAll, startStack, underWay, userNamer, waitFor, waitRuns, waitShared, withTabs } from './harness.js'

const TABS = 12
let stack

before(async () => { stack = await startStack({ cluster: true }) })
after(async () => { await stack?.stop() })

const newUser = userNamer('e2e')

test('twelve tabs through nginx: their instance gets SIGTERM mid-stream, every tab\'s text exact', { timeout: 120_000 }, async () => {
  await withTabs({ base: stack.url, user: newUser('rolling'), n: TABS }, async ({ pages, user }) => {
    const holding = await waitFor(() => stack.holding(user), { what: `${user}'s one socket on one instance` })
    const other = stack.gateways.find(g => g !== holding)
    const shape = { chunks: 60, delayMs: 80 }
    const prompts = await startAll(pages, 'rolling', shape)
    await underWay(pages, 'rolling', 5)
    holding.proc.kill('SIGTERM')
    const runs = await waitRuns(pages, 'rolling')
    assertExact(runs, prompts, shape.chunks, pages.keys())
    // It drained (its streams ran to their end) and exited on its own.
    const { code } = await holding.exited
    assert.equal(code, 0, `${holding.id} exited with ${code}: ${holding.stderr()}`)
    await waitShared(pages, 'the tabs sharing one socket again')
    await waitFor(async () => (await stack.holding(user)) === other, { what: `${user}'s socket on ${other.id}` })
    const stats = await stack.mock.stats()
    assert.equal(stats.requests, TABS, 'no stream was run twice')
    assert.equal(stats.aborted, 0, 'no upstream request was cut')
  })
})
