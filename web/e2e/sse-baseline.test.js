// 2. The baseline muxgate exists for: the same 12 tabs with plain per-tab SSE to one host over
// HTTP/1.1. Chromium allows 6 connections per host, so at most 6 streams run at once and the
// other 6 wait for a free connection. Run `npm run compare` for both numbers side by side.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import { launchBrowser, startStack } from './harness.js'
import { measureSse } from './baseline.js'

const TABS = 12
let stack
before(async () => { stack = await startStack() })
after(async () => { await stack?.stop() })

test('2. twelve tabs of plain SSE: at most 6 stream at once', { timeout: 120_000 }, async (t) => {
  const { context, close } = await launchBrowser()
  try {
    const sse = await measureSse(context, stack.gateway.url, stack.mock.url, TABS)
    t.diagnostic(`plain SSE: ${sse.exact}/${sse.tabs} exact, at most ${sse.maxConcurrent} streaming at once`)
    assert.equal(sse.exact, TABS, 'every SSE stream still completes, just later')
    assert.ok(sse.maxConcurrent <= 6, `${sse.maxConcurrent} SSE streams received data at the same time`)
    assert.ok(sse.maxConcurrent >= 2, 'streams did run in parallel up to the limit')
    assert.equal(sse.overlappingAll, 0, 'no SSE stream received data while all 11 others were open')
    // the 7th and later streams got their first byte only after an earlier one finished
    const ends = sse.runs.map(r => r.lastAt).sort((a, b) => a - b)
    const waited = sse.runs.filter(r => r.firstAt > ends[0]).length
    assert.ok(waited >= TABS - 6, `${waited} streams waited for a free connection`)
  } finally { await close() }
})
