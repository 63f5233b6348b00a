// Election on its own, over the fake LockManager: who leads, the queue, steal, resign, stop;
// and the leader epochs that order leaders.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import Election, { compareEpochs, nextEpoch } from '../src/election.js'
import { FakeLocks, until } from './fakes.js'

/** An Election on `locks` that records its hooks' calls. */
function candidate (locks, name = 'lock') {
  const seen = { elected: [], deposed: 0 }
  const election = new Election(locks, name, {
    onElected: how => seen.elected.push(how),
    onDeposed: () => seen.deposed++,
  })
  return { election, seen }
}

test('tryAcquire takes a free lock and refuses a held one', async () => {
  const locks = new FakeLocks()
  const a = candidate(locks)
  const b = candidate(locks)
  assert.equal(await a.election.tryAcquire(), true)
  assert.deepEqual(a.seen.elected, ['available'])
  assert.equal(await b.election.tryAcquire(), false)
  assert.deepEqual(b.seen.elected, [])
  a.election.stop()
})

test('resign hands the lock to the head of the queue, in the order they queued', async () => {
  const locks = new FakeLocks()
  const [a, b, c] = [candidate(locks), candidate(locks), candidate(locks)]
  await a.election.tryAcquire()
  b.election.queue()
  c.election.queue()
  a.election.resign()
  await until(() => b.seen.elected.length === 1, { what: 'b elected' })
  assert.deepEqual(b.seen.elected, ['queued'])
  assert.deepEqual(c.seen.elected, [])
  assert.equal(a.election.holding, false)
  b.election.stop()
  await until(() => c.seen.elected.length === 1, { what: 'c elected' })
  c.election.stop()
})

test('a steal deposes the holder: its onDeposed runs once, and it no longer holds', async () => {
  const locks = new FakeLocks()
  const [a, b] = [candidate(locks), candidate(locks)]
  await a.election.tryAcquire()
  b.election.queue()
  b.election.steal()
  await until(() => a.seen.deposed === 1 && b.seen.elected.includes('stolen'), { what: 'the steal' })
  assert.equal(a.election.holding, false)
  assert.equal(b.election.holding, true)
  assert.equal(b.election.waiting, null, 'its queued request was withdrawn')
  a.election.resign() // a late resign of the deposed holder changes nothing
  await new Promise(r => setTimeout(r, 20))
  assert.equal(b.election.holding, true)
  assert.equal(a.seen.deposed, 1)
  b.election.stop()
})

test('a stopped candidate hands back a grant that still arrives', async () => {
  const locks = new FakeLocks()
  const [a, b, c] = [candidate(locks), candidate(locks), candidate(locks)]
  await a.election.tryAcquire()
  b.election.queue()
  c.election.queue()
  b.election.stop() // withdraws from the queue
  a.election.resign()
  await until(() => c.seen.elected.length === 1, { what: 'c elected, b skipped' })
  assert.deepEqual(b.seen.elected, [])
  c.election.stop()
})

test('epochs follow the order of the lock, even between tabs that never heard of each other', () => {
  const t = 1_800_000_000_000
  // A takes the lock at t, B (a smaller tab id, never heard of A) steals it 3 ms later
  const a = nextEpoch(0, 'zzzz', t)
  const b = nextEpoch(0, 'aaaa', t + 3)
  assert.equal(compareEpochs(b, a), 1, 'the later taker wins whatever its tab id')
  // one that heard of a later epoch (a clock behind) still goes above it
  const c = nextEpoch(b.n, 'mmmm', t)
  assert.equal(compareEpochs(c, b), 1)
  assert.equal(c.n, b.n + 1)
  assert.equal(compareEpochs(nextEpoch(0, 'b', t), nextEpoch(0, 'a', t)), 1, 'a tie goes by tab id')
  assert.equal(compareEpochs(a, a), 0)
  assert.equal(compareEpochs(null, a), -1)
  assert.equal(compareEpochs(a, null), 1)
})
