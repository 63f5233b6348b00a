// The real SDKs on mux.fetch in real Chromium, against the real gateway and mock upstream:
// the official `openai` package (7.x and 6.x) and the AI SDK (`@ai-sdk/openai` `.chat()` and
// `@ai-sdk/openai-compatible`), in 12 tabs of one user that share ONE WebSocket. The page is
// e2e/sdk/page.js, bundled here with esbuild. Tests that need the gateway side of issue 12
// (upstream error details, tool calls) probe for it first and fail, saying which is missing.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import path from 'node:path'
import { build } from 'esbuild'
import {
  assertExact, expectedText, launchBrowser, leaderIndex, maxConcurrent, mockPrompt, openTabs, readRun,
  startStack, TIERS_FREE_AT_2_RPM, underWay, userNamer, waitFor, waitRuns, waitShared, WEB_DIR,
} from './harness.js'

const TABS = 12
const MODEL = 'deepseek-v3.2'
const CONFIG = TIERS_FREE_AT_2_RPM

const userFor = userNamer('sdk')
let stack
let browser
/** The 12 tabs of one user that most tests share. */
let pages
let user

const pageUrl = (u, tier = 'pro') => `${stack.gateway.url}/e2e/sdk/index.html?user=${encodeURIComponent(u)}&tier=${tier}`
const sdkRun = (page, key, kind, args) => page.evaluate(({ key, kind, args }) => window.sdkRun(key, kind, args), { key, kind, args })
const runOnce = async (page, key, kind, args, timeoutMs = 30_000) => {
  await sdkRun(page, key, kind, args)
  return (await waitRuns([page], key, { timeoutMs }))[0]
}

/**
 * What the gateway relays of issue 12, asked of the binary itself through the shim's own
 * `mux.chat` (not mux.fetch, which these tests are about): an upstream's error details, and
 * tool calls (the gateway allows `tools`, the mock answers `tools=N`).
 */
async function gatewayCan (page) {
  return page.evaluate(async (model) => {
    const { mux } = window.muxgateDemo
    const can = { upstreamErrors: '', tools: '' }
    try {
      await mux.chat({ model, messages: [{ role: 'user', content: 'probe [[mock fail=400 fail_code=probe_code]]' }] }).result
      can.upstreamErrors = 'the probe did not fail'
    } catch (err) {
      if (err.upstream?.code !== 'probe_code') can.upstreamErrors = `an upstream 400 came as ${JSON.stringify(err)}`
    }
    const tools = [{ type: 'function', function: { name: 'probe', parameters: { type: 'object', properties: {} } } }]
    try {
      const result = await mux.chat({ model, messages: [{ role: 'user', content: 'probe [[mock tools=1]]' }], params: { tools } }).result
      if (result.toolCalls.length !== 1) can.tools = `tools=1 answered ${JSON.stringify(result.toolCalls)}`
    } catch (err) {
      can.tools = `tools were refused: ${err.code}: ${err.message}`
    }
    return can
  }, MODEL)
}
let can

before(async () => {
  await build({
    entryPoints: [path.join(WEB_DIR, 'e2e/sdk/page.js')],
    outfile: path.join(WEB_DIR, 'e2e/sdk/dist/page.js'),
    bundle: true, format: 'esm', platform: 'browser', target: 'chrome120', logLevel: 'error',
  })
  stack = await startStack({ config: CONFIG })
  browser = await launchBrowser()
  user = userFor('tabs')
  pages = await openTabs(browser.context, pageUrl(user), TABS)
  await waitShared(pages)
  can = await gatewayCan(pages[1])
})

after(async () => {
  await browser?.close()
  await stack?.stop()
})

test('openai 7 and 6 in 12 tabs at once: exact text, the usage chunk, requestID, one WebSocket', { timeout: 120_000 }, async () => {
  const chunks = 30
  const prompts = []
  for (const [i, page] of pages.entries()) {
    prompts.push(mockPrompt(`openai tab ${i}: tell me something`, { chunks, delayMs: 40 }))
    await sdkRun(page, 'openai', 'openai', { version: i < TABS / 2 ? 7 : 6, model: MODEL, prompt: prompts[i] })
  }
  const runs = await waitRuns(pages, 'openai')
  assertExact(runs, prompts, chunks, runs.keys())
  for (const run of runs) {
    assert.equal(run.finishReason, 'stop')
    assert.ok(run.usage && run.usage.completion_tokens > 0, `usage chunk: ${JSON.stringify(run.usage)}`)
    // total_tokens: from a gateway with issue 12's usage (mux.fetch copies usage verbatim)
    if ('total_tokens' in run.usage) assert.equal(run.usage.total_tokens, run.usage.prompt_tokens + run.usage.completion_tokens)
    assert.match(run.requestId, /^[A-Za-z0-9._-]+:\d+$/)
  }
  assert.equal(new Set(runs.map(r => r.requestId)).size, TABS, 'one stream per call')
  // more at once than the 6 connections HTTP/1.1 gives an origin: they share the socket
  assert.ok(maxConcurrent(runs) > 6, `at most ${maxConcurrent(runs)} streams were receiving at once`)
  assert.equal((await stack.gateway.admin(user)).connections_total, 1, 'one WebSocket for the 12 tabs')
})

test('AI SDK in 12 tabs: streamText (half @ai-sdk/openai .chat(), half openai-compatible) and generateText', { timeout: 120_000 }, async () => {
  const chunks = 12
  const prompts = pages.map((_, i) => mockPrompt(`ai tab ${i}: tell me something`, { chunks, delayMs: 30 }))
  const provider = i => i < TABS / 2 ? 'openai' : 'compatible'
  for (const [i, page] of pages.entries()) await sdkRun(page, 'ai', 'aiStream', { provider: provider(i), model: MODEL, prompt: prompts[i] })
  const runs = await waitRuns(pages, 'ai')
  for (const [i, run] of runs.entries()) {
    assert.equal(run.error, null, `tab ${i} (${provider(i)}): ${JSON.stringify(run.error)}`)
    assert.equal(run.text, expectedText(prompts[i], chunks), `tab ${i} (${provider(i)}) text`)
    assert.equal(run.finishReason, 'stop')
    assert.ok(run.usage.outputTokens > 0 && run.usage.inputTokens > 0, `tab ${i} usage ${JSON.stringify(run.usage)}`)
    assert.equal(run.usage.totalTokens, run.usage.inputTokens + run.usage.outputTokens)
  }
  for (const [i, page] of pages.entries()) await sdkRun(page, 'aiGen', 'aiGenerate', { provider: provider(i), model: MODEL, prompt: prompts[i] })
  const generated = await waitRuns(pages, 'aiGen')
  for (const [i, run] of generated.entries()) {
    assert.equal(run.error, null, `tab ${i} (${provider(i)}): ${JSON.stringify(run.error)}`)
    assert.equal(run.text, expectedText(prompts[i], chunks), `tab ${i} generateText`)
    assert.equal(run.finishReason, 'stop')
    assert.ok(run.usage.totalTokens > 0)
  }
  assert.equal((await stack.gateway.admin(user)).connections_total, 1)
})

test('a follower aborts mid-stream: its loop ends quietly and the upstream request is aborted', { timeout: 60_000 }, async () => {
  const follower = pages[(await leaderIndex(pages) + 1) % TABS]
  const before = (await stack.mock.stats()).aborted
  const prompt = mockPrompt('abort me: tell me a long story', { chunks: 400, delayMs: 25 })
  const run = await runOnce(follower, 'abort', 'openai', { version: 7, model: MODEL, prompt, abortAfter: 5 })
  assert.equal(run.error, null, `the loop ended quietly: ${JSON.stringify(run.error)}`)
  assert.equal(run.aborted, true)
  assert.ok(run.deltas >= 5 && run.deltas < 400, `${run.deltas} deltas`)
  assert.ok(expectedText(prompt, 400).startsWith(run.text))
  await waitFor(async () => (await stack.mock.stats()).aborted === before + 1, { what: 'the mock to count one aborted request' })
  await waitFor(async () => (await stack.gateway.admin(user)).live_streams === 0, { what: 'the stream to end in the gateway' })
})

test('the upstream cut mid-stream: openai 7 and 6 throw the error event from the loop, after the text that came', { timeout: 60_000 }, async () => {
  for (const version of [7, 6]) {
    const prompt = `cut me ${version} [[mock chunks=10 delay_ms=10 cut=4]]`
    const run = await runOnce(pages[6], `cut${version}`, 'openai', { version, model: MODEL, prompt, maxRetries: 0 })
    assert.equal(run.error?.name, 'APIError', JSON.stringify(run.error))
    assert.equal(run.error.code, 'upstream_error')
    assert.equal(run.error.status, null, 'an error event, not an HTTP status')
    assert.equal(run.text, expectedText(prompt, 4))
  }
})

test('a user at user_rpm = 2: the third call is a RateLimitError with retry-after-ms', { timeout: 60_000 }, async () => {
  // another user in the same browser: its own `name`, so its own socket and token
  const limited = userFor('rpm')
  const [page] = await openTabs(browser.context, pageUrl(limited, 'free'), 1)
  try {
    const prompt = n => mockPrompt(`rpm call ${n}`, { chunks: 2, delayMs: 0 })
    for (const n of [1, 2]) {
      const run = await runOnce(page, `rpm${n}`, 'openaiOnce', { version: 7, model: MODEL, prompt: prompt(n), maxRetries: 0 })
      assert.equal(run.error, null, `call ${n}: ${JSON.stringify(run.error)}`)
      assert.equal(run.text, expectedText(prompt(n), 2))
    }
    const third = await runOnce(page, 'rpm3', 'openai', { version: 6, model: MODEL, prompt: prompt(3), maxRetries: 0 })
    assert.equal(third.error?.name, 'RateLimitError', JSON.stringify(third.error))
    assert.equal(third.error.status, 429)
    assert.equal(third.error.code, 'rate_limited')
    assert.ok(Number(third.error.retryAfterMs) > 0, `retry-after-ms ${third.error.retryAfterMs}`)
    assert.equal(third.error.shouldRetry, 'true')
    assert.equal((await stack.gateway.admin(limited)).connections_total, 1)
  } finally { await page.close() }
})

test('an upstream 400 is a BadRequestError with the upstream\'s code and param', { timeout: 60_000 }, async () => {
  assert.equal(can.upstreamErrors, '', 'the gateway relays the upstream error details (issue 12)')
  for (const [version, kind] of [[7, 'openaiOnce'], [6, 'openai']]) {
    // Each its own failure key: the mock fails a key's first request only (fail_times=1).
    const prompt = `too long [[mock fail=400 key=bad${version} fail_code=context_length_exceeded fail_type=invalid_request_error fail_param=messages]]`
    const run = await runOnce(pages[2], `bad${version}`, kind, { version, model: MODEL, prompt, maxRetries: 0 })
    assert.equal(run.error?.name, 'BadRequestError', JSON.stringify(run.error))
    assert.equal(run.error.status, 400)
    assert.equal(run.error.code, 'context_length_exceeded')
    assert.equal(run.error.param, 'messages')
    assert.equal(run.error.type, 'invalid_request_error')
  }
})

test('tool calls: openai stream().finalChatCompletion() in 7 and 6, names, ids and arguments exact', { timeout: 60_000 }, async () => {
  assert.equal(can.tools, '', 'the gateway relays tool calls (issue 12)')
  for (const version of [7, 6]) {
    const run = await runOnce(pages[3], `tools${version}`, 'openaiToolStream', {
      version, model: MODEL, prompt: `Weather in Paris and Tokyo [[mock tools=2 delay_ms=20]]`, tools: ['get_weather', 'get_time'],
    })
    assert.equal(run.error, null, JSON.stringify(run.error))
    assert.equal(run.finishReason, 'tool_calls')
    assert.deepEqual(run.toolCalls.map(c => c.function.name), ['get_weather', 'get_time'])
    assert.deepEqual(run.toolCalls, run.shimToolCalls, 'what the SDK merged is what the stream carried')
    for (const call of run.toolCalls) {
      assert.match(call.id, /^call_/)
      assert.equal(typeof JSON.parse(call.function.arguments), 'object')
    }
  }
})

test('tool calls: openai runTools() and AI SDK streamText with a tool run the loop against the mock', { timeout: 90_000 }, async () => {
  assert.equal(can.tools, '', 'the gateway relays tool calls (issue 12)')
  const prompt = 'What is the weather in Paris today?'
  const run = await runOnce(pages[4], 'runTools', 'openaiRunTools', { version: 7, model: MODEL, prompt })
  assert.equal(run.error, null, JSON.stringify(run.error))
  assert.equal(run.requests, 2, 'the call, then the answer after the tool result')
  assert.equal(run.calls.length, 1)
  assert.equal(JSON.parse(run.shimToolCalls[0].function.arguments).city, run.calls[0], 'the SDK called with the arguments streamed')
  assert.ok(run.text.includes(`sunny in ${run.calls[0]}`), `the answer quotes the tool: ${run.text}`)
  for (const provider of ['openai', 'compatible']) {
    const ai = await runOnce(pages[5], `aiTools-${provider}`, 'aiTools', { provider, model: MODEL, prompt })
    assert.equal(ai.error, null, `${provider}: ${JSON.stringify(ai.error)}`)
    assert.equal(ai.toolCalls.length, 1)
    const streamed = ai.shimToolCalls[0]
    assert.deepEqual(ai.toolCalls[0], { id: streamed.id, name: 'get_weather', input: JSON.parse(streamed.function.arguments) })
    assert.deepEqual(ai.calls, [ai.toolCalls[0].input.city])
    assert.ok(ai.text.includes(`sunny in ${ai.calls[0]}`), `${provider}: ${ai.text}`)
  }
})

test('the leader tab closed mid-stream: every follower\'s SDK loop finishes exact', { timeout: 120_000 }, async () => {
  const chunks = 40
  const prompts = []
  for (const [i, page] of pages.entries()) {
    prompts.push(mockPrompt(`handover tab ${i}: tell me something`, { chunks, delayMs: 50 }))
    await sdkRun(page, 'handover', 'openai', { version: i % 2 ? 6 : 7, model: MODEL, prompt: prompts[i] })
  }
  await underWay(pages, 'handover', 3)
  const leader = await leaderIndex(pages)
  await pages[leader].close()
  const rest = pages.filter((_, i) => i !== leader)
  const runs = await waitRuns(rest, 'handover', { timeoutMs: 90_000 })
  const followers = [...pages.keys()].filter(i => i !== leader)
  const byIndex = []
  followers.forEach((i, k) => { byIndex[i] = runs[k] })
  assertExact(byIndex, prompts, chunks, followers)
  for (const i of followers) assert.equal(byIndex[i].usage.completion_tokens > 0, true)
  assert.equal((await readRun(rest[0], 'handover')).error, null)
  pages = rest
})
