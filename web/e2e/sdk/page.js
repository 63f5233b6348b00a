// The SDK test page: the shim, plus the official `openai` SDK (7.x and, aliased, 6.x) and the
// AI SDK (`@ai-sdk/openai` `.chat()` and `@ai-sdk/openai-compatible`), each given `mux.fetch`
// exactly as an app would. sdk.test.js bundles it with esbuild into dist/page.js and drives
// it through `window.sdkRun(key, kind, args)`, whose progress is kept in `window.__runs[key]`
// in the harness's run shape (text, deltas, firstAt, lastAt, ended, error, ...).
import OpenAI, * as sdk7 from 'openai'
import OpenAI6, * as sdk6 from 'openai6'
import { createOpenAI } from '@ai-sdk/openai'
import { createOpenAICompatible } from '@ai-sdk/openai-compatible'
import { generateText, jsonSchema, stepCountIs, streamText, tool } from 'ai'
import { connect } from '../../src/index.js'

const params = new URLSearchParams(location.search)
const user = params.get('user') ?? 'sdk'
const tier = params.get('tier') ?? 'pro'
const token = async () => (await (await fetch(`/dev/token?user=${encodeURIComponent(user)}&tier=${encodeURIComponent(tier)}`)).json()).token
// One user per socket: tabs of different users on one origin need their own `name`.
const mux = connect({ url: '/v1/ws', token, name: `sdk-test:${user}` })

// Every stream mux.fetch opens, in order, so a test can compare what an SDK parsed with what
// the shim received for the same stream (ChatStream.result).
const opened = []
const chat = mux.chat.bind(mux)
mux.chat = (request) => {
  const stream = chat(request)
  opened.push(stream)
  return stream
}

const baseURL = `${location.origin}/v1`
const openai = (version, opts = {}) => new (version === 6 ? OpenAI6 : OpenAI)({
  baseURL, apiKey: 'muxgate', dangerouslyAllowBrowser: true, fetch: mux.fetch, ...opts,
})
const aiModel = (provider, model) => provider === 'compatible'
  ? createOpenAICompatible({ name: 'muxgate', baseURL, fetch: mux.fetch, includeUsage: true })(model)
  : createOpenAI({ baseURL, apiKey: 'muxgate', fetch: mux.fetch }).chat(model)
const now = () => performance.timeOrigin + performance.now()

/** One text delta of `run`, with the times the harness's helpers read. */
function record (run, text) {
  const t = now()
  if (run.firstAt === null) run.firstAt = t
  run.lastAt = t
  run.text += text
  run.deltas++
}

// The bundle renames one of two same-named classes, so errors are named by their class.
const ERROR_CLASSES = ['BadRequestError', 'AuthenticationError', 'NotFoundError', 'RateLimitError',
  'InternalServerError', 'APIConnectionError', 'APIUserAbortError', 'APIError']

/** What a test needs of an SDK error (they do not survive `evaluate` whole). */
function describe (err) {
  const cls = ERROR_CLASSES.find(name => err instanceof sdk7[name] || err instanceof sdk6[name])
  return {
    name: cls ?? err?.name ?? typeof err,
    message: String(err?.message ?? err),
    status: err?.status ?? err?.statusCode ?? null,
    code: err?.code ?? null,
    param: err?.param ?? null,
    type: err?.type ?? null,
    retryAfterMs: err?.headers?.get?.('retry-after-ms') ?? null,
    shouldRetry: err?.headers?.get?.('x-should-retry') ?? null,
  }
}

/** The merged tool calls the shim received for the streams opened since `from`. */
async function shimToolCalls (from) {
  const out = []
  for (const s of opened.slice(from)) {
    const result = await s.result.catch(() => null)
    if (result) out.push(...result.toolCalls)
  }
  return out
}

const TOOL_SCHEMA = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }

const kinds = {
  /** openai `create({stream: true, stream_options: {include_usage: true}})`, read to the end (or aborted after `abortAfter` texts). */
  async openai (run, { version, model, prompt, abortAfter, maxRetries }) {
    const ac = new AbortController()
    const client = openai(version, maxRetries === undefined ? {} : { maxRetries })
    const { data, request_id: requestId } = await client.chat.completions.create({
      model, messages: [{ role: 'user', content: prompt }], stream: true, stream_options: { include_usage: true },
    }, { signal: ac.signal }).withResponse()
    run.requestId = requestId
    run.id = requestId
    for await (const chunk of data) {
      run.chunks++
      if (chunk.usage) run.usage = chunk.usage
      const choice = chunk.choices[0]
      if (choice?.finish_reason) run.finishReason = choice.finish_reason
      const text = choice?.delta?.content
      if (text) {
        record(run, text)
        if (run.deltas === abortAfter) ac.abort()
      }
    }
    run.aborted = ac.signal.aborted
  },
  /** openai non-streaming `create`. */
  async openaiOnce (run, { version, model, prompt, maxRetries }) {
    const client = openai(version, maxRetries === undefined ? {} : { maxRetries })
    const completion = await client.chat.completions.create({ model, messages: [{ role: 'user', content: prompt }] })
    run.requestId = completion._request_id
    run.text = completion.choices[0].message.content
    run.finishReason = completion.choices[0].finish_reason
    run.usage = completion.usage
  },
  /** AI SDK `streamText`. */
  async aiStream (run, { provider, model, prompt }) {
    let failure = null
    const result = streamText({ model: aiModel(provider, model), prompt, maxRetries: 0, onError: ({ error }) => { failure = error } })
    for await (const text of result.textStream) record(run, text)
    if (failure) throw failure
    run.finishReason = await result.finishReason
    const usage = await result.usage
    run.usage = { inputTokens: usage.inputTokens, outputTokens: usage.outputTokens, totalTokens: usage.totalTokens }
  },
  /** AI SDK `generateText` (non-streaming). */
  async aiGenerate (run, { provider, model, prompt }) {
    const result = await generateText({ model: aiModel(provider, model), prompt, maxRetries: 0 })
    run.text = result.text
    run.finishReason = result.finishReason
    run.usage = { inputTokens: result.usage.inputTokens, outputTokens: result.usage.outputTokens, totalTokens: result.usage.totalTokens }
  },
  /** openai `chat.completions.stream({tools}).finalChatCompletion()`. */
  async openaiToolStream (run, { version, model, prompt, tools }) {
    const from = opened.length
    const final = await openai(version).chat.completions.stream({
      model, messages: [{ role: 'user', content: prompt }],
      tools: tools.map(name => ({ type: 'function', function: { name, parameters: TOOL_SCHEMA } })),
    }).finalChatCompletion()
    run.finishReason = final.choices[0].finish_reason
    run.toolCalls = final.choices[0].message.tool_calls ?? []
    run.shimToolCalls = await shimToolCalls(from)
  },
  /** openai `runTools`: the SDK calls our function with the model's arguments, then asks again. */
  async openaiRunTools (run, { version, model, prompt }) {
    const from = opened.length
    run.calls = []
    const runner = openai(version).chat.completions.runTools({
      model, messages: [{ role: 'user', content: prompt }],
      tools: [{
        type: 'function',
        function: {
          name: 'get_weather', parameters: TOOL_SCHEMA, parse: JSON.parse,
          function: ({ city }) => { run.calls.push(city); return `sunny in ${city}` },
        },
      }],
    })
    run.text = await runner.finalContent()
    run.shimToolCalls = await shimToolCalls(from)
    run.requests = opened.length - from
  },
  /** AI SDK `streamText` with a tool and two steps. */
  async aiTools (run, { provider, model, prompt }) {
    const from = opened.length
    run.calls = []
    const weather = tool({
      description: 'the weather in a city',
      inputSchema: jsonSchema(TOOL_SCHEMA),
      execute: async ({ city }) => { run.calls.push(city); return `sunny in ${city}` },
    })
    let failure = null
    const result = streamText({
      model: aiModel(provider, model), prompt, tools: { get_weather: weather }, stopWhen: stepCountIs(2),
      maxRetries: 0, onError: ({ error }) => { failure = error },
    })
    for await (const text of result.textStream) run.text += text
    if (failure) throw failure
    const steps = await result.steps
    run.toolCalls = steps.flatMap(s => s.toolCalls.map(c => ({ id: c.toolCallId, name: c.toolName, input: c.input })))
    run.shimToolCalls = await shimToolCalls(from)
    run.finishReason = await result.finishReason
  },
}

window.muxgateDemo = { mux }
window.__runs = {}
/** Starts scenario `kind` with `args`; its progress and outcome go to `window.__runs[key]`. */
window.sdkRun = (key, kind, args) => {
  const run = { id: null, text: '', deltas: 0, chunks: 0, firstAt: null, lastAt: null, ended: false, error: null, usage: null }
  window.__runs[key] = run
  kinds[kind](run, args)
    .catch((err) => { run.error = describe(err) })
    .finally(() => { run.ended = true })
}
