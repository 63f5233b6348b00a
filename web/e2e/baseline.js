// The comparison behind the README's numbers: the same N tabs of one browser context stream
// the same answers, once through muxgate (one shared WebSocket) and once as plain per-tab SSE
// (a streaming fetch per tab to one host over HTTP/1.1). Used by sse-baseline.test.js and by
// compare.js, which prints both numbers.
import {
  expectedText, maxConcurrent, mockPrompt, openTabs, startChat, startSse, streamsOverlapping,
  waitRuns, waitSse, waitShared,
} from './harness.js'

/** Each stream lasts ~2 s: long enough that, started together, they overlap if allowed to. */
export const SHAPE = { chunks: 20, delayMs: 100, stallMs: 150 }

/**
 * @returns {Promise<{tabs: number, exact: number, maxConcurrent: number, overlappingAll: number, runs: any[]}>}
 */
async function summarize (runs, prompts) {
  const exact = runs.filter((r, i) => !r.error && r.text === expectedText(prompts[i], SHAPE.chunks)).length
  return {
    tabs: runs.length,
    exact,
    maxConcurrent: maxConcurrent(runs),
    overlappingAll: streamsOverlapping(runs, runs.length - 1),
    runs,
  }
}

/** N tabs at `baseUrl` (the demo), one stream each through the shim. */
export async function measureMuxgate (context, baseUrl, user, n) {
  const pages = await openTabs(context, `${baseUrl}/?user=${encodeURIComponent(user)}`, n)
  await waitShared(pages)
  const prompts = pages.map((_, i) => mockPrompt(`compare tab ${i}`, SHAPE))
  for (const [i, page] of pages.entries()) await startChat(page, 'compare', prompts[i])
  const runs = await waitRuns(pages, 'compare', { timeoutMs: 60_000 })
  for (const page of pages) await page.close()
  return summarize(runs, prompts)
}

/** N tabs at `baseUrl`, one plain SSE fetch each to the mock upstream at `mockUrl`. */
export async function measureSse (context, baseUrl, mockUrl, n) {
  // any page of the gateway's origin will do; the fetches go to the mock's origin (CORS)
  const pages = await openTabs(context, `${baseUrl}/?user=sse-baseline`, n)
  const prompts = pages.map((_, i) => mockPrompt(`compare tab ${i}`, SHAPE))
  for (const [i, page] of pages.entries()) await startSse(page, 'sse', mockUrl, prompts[i])
  const runs = await waitSse(pages, 'sse', { timeoutMs: 90_000 })
  for (const page of pages) await page.close()
  return summarize(runs, prompts)
}
