import { CLIENT_ERROR_CODE, ERROR_CODE, PART } from './constants.js'

/**
 * The OpenAI chat-completions encoding of one muxgate stream: the `chat.completion.chunk`
 * server-sent events of a streaming answer, the `chat.completion` object of a non-streaming
 * one, and an error as an HTTP status, headers and OpenAI's error body.
 *
 * docs/openai-compat.md is the byte-exact specification of everything here: the gateway's
 * own `POST /v1/chat/completions` writes the same bytes for the same frames (a test compares
 * the two), so a change here is a change of that document first. Nothing here reads a
 * clock or a random source: ids and `created` come from the caller.
 *
 * @example
 * const enc = new ChunkEncoder({ id: stream.id, created, model, includeUsage: true })
 * for await (const part of stream.parts()) write(enc.part(part))
 * write(enc.done(await stream.result))
 */

/** `chatcmpl-<stream id>`: the `id` of every chunk and of the completion. */
export const completionId = streamId => `chatcmpl-${streamId}`

/** Unix seconds, as `created` wants them. @param {number} ms */
export const unixSeconds = ms => Math.floor(ms / 1000)

const SSE_DONE = 'data: [DONE]\n\n'

/**
 * Turns one stream's parts (`ChatStream.parts()`) and its end into SSE text, one event per
 * part. Stateful only in what the spec needs: whether the first chunk (the one with
 * `role: "assistant"`) went out, and whether any tool call did (for a missing finish reason).
 */
export class ChunkEncoder {
  /**
   * @param {{id: string, created: number, model: string, includeUsage?: boolean}} stream
   *   `id` the stream id, `created` Unix seconds when it was opened, `model` the one the
   *   request asked for, `includeUsage` the request's `stream_options.include_usage`
   */
  constructor ({ id, created, model, includeUsage = false }) {
    this.id = completionId(id)
    this.created = created
    this.model = model
    this.includeUsage = includeUsage === true
    this.started = false
    this.calledTools = false
  }

  /**
   * One part as one `data:` event; '' for a part that carries nothing.
   * @param {{type: string, text?: string, index?: number, id?: string, name?: string,
   *   arguments?: string, logprobs?: object}} part
   * @returns {string}
   */
  part (part) {
    const delta = {}
    switch (part.type) {
      case PART.reasoning:
        if (!part.text) return ''
        delta.reasoning_content = part.text
        break
      case PART.refusal:
        if (!part.text) return ''
        delta.refusal = part.text
        break
      case PART.text:
        if (!part.text) return ''
        delta.content = part.text
        break
      case PART.toolCall:
        delta.tool_calls = [toolCallFragment(part)]
        this.calledTools = true
        break
      default:
        return ''
    }
    const logprobs = part.type !== PART.reasoning && part.logprobs ? part.logprobs : undefined
    return this.event(delta, null, logprobs)
  }

  /**
   * The end of a stream that finished: the chunk with its `finish_reason`, the usage chunk
   * when the request asked for it, then `[DONE]`.
   * @param {{finish_reason?: string|null, usage?: object|null, model?: string,
   *   system_fingerprint?: string}} done the `done` frame, or `ChatStream.result`
   * @returns {string}
   */
  done (done) {
    const model = typeof done.model === 'string' ? done.model : this.model
    const fingerprint = typeof done.system_fingerprint === 'string' ? done.system_fingerprint : undefined
    let out = this.event({}, finishReason(done.finish_reason, this.calledTools), undefined, model, fingerprint)
    if (this.includeUsage) {
      const chunk = this.head(model, fingerprint)
      chunk.choices = []
      chunk.usage = done.usage ?? null
      out += `data: ${JSON.stringify(chunk)}\n\n`
    }
    return out + SSE_DONE
  }

  /**
   * A stream that failed after its first event: one `error` event (no `[DONE]`); the body
   * ends after it.
   * @param {{code: string, message?: string, status?: number, upstream?: object}} error
   * @returns {string}
   */
  error (error) {
    return `event: error\ndata: ${JSON.stringify(errorBody(error))}\n\n`
  }

  /** @param {string} [model] @param {string} [fingerprint] */
  head (model = this.model, fingerprint) {
    const chunk = { id: this.id, object: 'chat.completion.chunk', created: this.created, model }
    if (fingerprint !== undefined) chunk.system_fingerprint = fingerprint
    return chunk
  }

  /**
   * @param {object} delta @param {string|null} finish @param {object} [logprobs]
   * @param {string} [model] @param {string} [fingerprint]
   */
  event (delta, finish, logprobs, model, fingerprint) {
    const chunk = this.head(model, fingerprint)
    const choice = { index: 0, delta: this.started ? delta : { role: 'assistant', ...delta } }
    this.started = true
    if (logprobs !== undefined) choice.logprobs = logprobs
    choice.finish_reason = finish
    chunk.choices = [choice]
    return `data: ${JSON.stringify(chunk)}\n\n`
  }
}

/** @param {{index: number, id?: string, name?: string, arguments?: string}} part */
function toolCallFragment (part) {
  const fragment = { index: part.index }
  if (typeof part.id === 'string') {
    fragment.id = part.id
    fragment.type = 'function'
  }
  const fn = {}
  if (typeof part.name === 'string' && part.name) fn.name = part.name
  fn.arguments = typeof part.arguments === 'string' ? part.arguments : ''
  fragment.function = fn
  return fragment
}

/**
 * The upstream's finish reason; when it sent none, `tool_calls` for an answer that called
 * tools, else `stop` (the SDKs refuse a choice without one).
 * @param {unknown} reason @param {boolean} calledTools
 */
export function finishReason (reason, calledTools) {
  if (typeof reason === 'string' && reason) return reason
  return calledTools ? 'tool_calls' : 'stop'
}

/**
 * The non-streaming answer: one `chat.completion` object, tool calls merged.
 * @param {{id: string, created: number, model: string}} stream as for ChunkEncoder
 * @param {import('./index.d.ts').ChatResult & {model?: string, logprobs?: object}} result `ChatStream.result`
 * @returns {object}
 */
export function completion ({ id, created, model }, result) {
  const message = { role: 'assistant', content: result.text ? result.text : null }
  if (result.reasoning) message.reasoning_content = result.reasoning
  message.refusal = result.refusal ?? null
  const toolCalls = result.toolCalls ?? []
  if (toolCalls.length > 0) {
    message.tool_calls = toolCalls.map(c => ({
      id: c.id, type: c.type, function: { name: c.function.name, arguments: c.function.arguments },
    }))
  }
  const out = {
    id: completionId(id),
    object: 'chat.completion',
    created,
    model: typeof result.model === 'string' ? result.model : model,
  }
  if (typeof result.system_fingerprint === 'string') out.system_fingerprint = result.system_fingerprint
  const choice = { index: 0, message }
  if (result.logprobs) choice.logprobs = result.logprobs
  choice.finish_reason = finishReason(result.finish_reason, toolCalls.length > 0)
  out.choices = [choice]
  if (result.usage) out.usage = result.usage
  return out
}

/**
 * How each error code answers over HTTP: the status, OpenAI's error `type`, and whether a
 * client should try again (`x-should-retry`). docs/openai-compat.md has this table.
 *
 * The gateway already retried the upstream (`retry.max_attempts`, with backoff) before it
 * said `upstream_error` or `upstream_timeout`: an SDK that retried again would multiply the
 * attempts, so those say no, unless the gateway named a time (its circuit breaker is open).
 */
export const HTTP_ERROR = Object.freeze({
  [ERROR_CODE.badRequest]: { status: 400, type: 'invalid_request_error', retry: false },
  [ERROR_CODE.unauthorized]: { status: 401, type: 'authentication_error', retry: false },
  [ERROR_CODE.notFound]: { status: 404, type: 'invalid_request_error', retry: false },
  [ERROR_CODE.duplicateId]: { status: 409, type: 'invalid_request_error', retry: false },
  [ERROR_CODE.rateLimited]: { status: 429, type: 'rate_limit_error', retry: true },
  [ERROR_CODE.tooManyStreams]: { status: 429, type: 'rate_limit_error', retry: true },
  [CLIENT_ERROR_CODE.tooManyConnections]: { status: 429, type: 'rate_limit_error', retry: false },
  [ERROR_CODE.budgetExceeded]: { status: 429, type: 'insufficient_quota', retry: false },
  [ERROR_CODE.cancelled]: { status: 499, type: 'cancelled', retry: false },
  [ERROR_CODE.internal]: { status: 500, type: 'server_error', retry: true },
  [ERROR_CODE.upstreamError]: { status: 502, type: 'upstream_error', retry: false },
  [ERROR_CODE.overloaded]: { status: 503, type: 'overloaded_error', retry: true },
  [ERROR_CODE.upstreamTimeout]: { status: 504, type: 'timeout_error', retry: false },
})

const UNKNOWN_ERROR = Object.freeze({ status: 500, type: 'server_error', retry: false })

/**
 * OpenAI's error body for a muxgate error: `code`, `type` and `param` are the upstream's when
 * it said them, muxgate's otherwise; `muxgate_code` is always muxgate's code.
 * @param {{code: string, message?: string, upstream?: {type?: string, code?: string, param?: string}}} error
 * @returns {{error: {message: string, type: string, param: string|null, code: string, muxgate_code: string}}}
 */
export function errorBody (error) {
  const row = HTTP_ERROR[error.code] ?? UNKNOWN_ERROR
  const upstream = error.upstream ?? {}
  return {
    error: {
      message: error.message || error.code,
      type: upstream.type ?? row.type,
      param: upstream.param ?? null,
      code: upstream.code ?? error.code,
      muxgate_code: error.code,
    },
  }
}

/**
 * An error as an HTTP answer: status, headers (retry hints), body.
 * @param {{code: string, message?: string, retry_after_ms?: number, retryAfterMs?: number,
 *   status?: number, upstream?: object}} error an `error` frame or a MuxError
 * @param {string|null} [streamId] for `x-request-id`
 * @returns {{status: number, headers: Array<[string, string]>, body: string}}
 */
export function errorResponse (error, streamId = null) {
  const row = HTTP_ERROR[error.code] ?? UNKNOWN_ERROR
  let status = row.status
  if (error.code === ERROR_CODE.upstreamError && Number.isInteger(error.status) && error.status >= 400 && error.status <= 599) {
    status = error.status
  }
  const wait = error.retry_after_ms ?? error.retryAfterMs
  const hasWait = typeof wait === 'number' && Number.isFinite(wait) && wait >= 0
  const retry = error.code === ERROR_CODE.upstreamError ? hasWait : row.retry
  const headers = [['content-type', 'application/json']]
  if (streamId) headers.push(['x-request-id', streamId])
  headers.push(['x-should-retry', String(retry)])
  if (hasWait) {
    headers.push(['retry-after', String(Math.ceil(wait / 1000))])
    headers.push(['retry-after-ms', String(Math.ceil(wait))])
  }
  return { status, headers, body: JSON.stringify(errorBody(error)) }
}
