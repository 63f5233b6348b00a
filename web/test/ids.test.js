import { test } from 'node:test'
import assert from 'node:assert/strict'
import { isValidStreamId, makeTabId, streamId, tabOf } from '../src/ids.js'

test('tab ids are 10 base-36 chars, unique, without the id separator', () => {
  const ids = new Set()
  for (let i = 0; i < 2000; i++) {
    const id = makeTabId()
    assert.match(id, /^[0-9a-z]{10}$/)
    ids.add(id)
  }
  assert.equal(ids.size, 2000)
})

test('tab id from biased bytes still only uses the alphabet', () => {
  // bytes >= 252 must be rejected (modulo bias), asking for more randomness
  let calls = 0
  const id = makeTabId((n) => { calls++; return new Uint8Array(n).fill(calls === 1 ? 255 : 1) })
  assert.equal(id, '1111111111')
  assert.ok(calls > 1)
})

test('stream ids are prefixed with their tab and map back to it', () => {
  const id = streamId('k3f9a2x0qz', 7)
  assert.equal(id, 'k3f9a2x0qz:7')
  assert.equal(tabOf(id), 'k3f9a2x0qz')
  assert.ok(isValidStreamId(id))
  assert.equal(tabOf('noprefix'), null)
  assert.equal(tabOf(':x'), null)
  assert.equal(tabOf(42), null)
})

test('stream ids respect the protocol alphabet and length', () => {
  assert.throws(() => streamId('bad tab', 1), TypeError)
  assert.throws(() => streamId('x'.repeat(64), 1), TypeError)
  assert.ok(!isValidStreamId(''))
  assert.ok(!isValidStreamId('a/b'))
  assert.ok(isValidStreamId('A-z_0.9:1'))
})
