import { CLIENT_ERROR_CODE, ERROR_CODE } from './constants.js'
import { ChunkEncoder, completion, errorResponse, unixSeconds } from './openai.js'

/**
 * A `fetch` for OpenAI-compatible SDKs (the official `openai` package, the AI SDK's
 * `@ai-sdk/openai` `.chat()` and `@ai-sdk/openai-compatible`): `POST …/chat/completions`
 * opens a muxgate stream on the tab's shared socket and answers as OpenAI's API would, in
 * the bytes docs/openai-compat.md specifies (./openai.js writes them). Every other request
 * goes to `fallback`, or gets a 404 in OpenAI's error shape.
 *
 * The status and headers wait for the stream's first part, its `done` or its `error`: until
 * then the gateway may still retry or fall back, so an early error is still a real HTTP
 * status the SDK can act on (`RateLimitError`, retry hints). A stream the shim lost before
 * any byte (the tab's connection was closed, the leader tab vanished with it, the gateway
 * forgot it) is a network error, as a dropped connection is for `fetch`: the SDKs retry it.
 *
 * @example
 * const client = new OpenAI({ baseURL: location.origin + '/v1', apiKey: 'muxgate',
 *                             dangerouslyAllowBrowser: true, fetch: mux.fetch })
 * for await (const chunk of await client.chat.completions.create({ model, messages, stream: true })) {
 *   out.append(chunk.choices[0]?.delta?.content ?? '')
 * }
 *
 * @param {{chat: (request: object) => import('./stream.js').default, cannotConnect?: () => boolean,
 *   httpUrl?: (path: string) => string, httpToken?: () => Promise<string>}} mux
 * @param {{fallback?: typeof fetch, transport?: 'auto'|'websocket'|'http'}} [options] `fallback`
 *   serves every request that is not `POST …/chat/completions` (e.g. `globalThis.fetch` for
 *   `GET /v1/models` over HTTP); it is called with one argument, the `Request` built from the
 *   caller's input and init. `transport`: see TRANSPORT (default `auto`)
 * @returns {typeof fetch}
 */
export function createFetch (mux, { fallback, transport = TRANSPORT.auto } = {}) {
  if (fallback != null && typeof fallback !== 'function') {
    throw new TypeError('createFetch(): `fallback` must be a fetch function')
  }
  if (!Object.values(TRANSPORT).includes(transport)) {
    throw new TypeError(`createFetch(): \`transport\` must be one of ${Object.values(TRANSPORT).join(', ')}`)
  }
  return async function muxFetch (input, init) {
    // The platform's own parsing: every input form fetch takes (string, URL, Request;
    // headers as Headers, object or pairs; any body), its errors thrown as fetch throws them.
    const request = new Request(input, init)
    if (!servesChatCompletions(request)) {
      return fallback ? fallback(request) : notServed(request)
    }
    if (transport === TRANSPORT.http || (transport === TRANSPORT.auto && mux.cannotConnect?.())) {
      return overHttp(mux, request)
    }
    const signal = request.signal
    if (signal.aborted) throw signal.reason
    let body
    try {
      body = JSON.parse(await request.text())
    } catch (err) {
      if (signal.aborted) throw signal.reason
      return httpError({ code: ERROR_CODE.badRequest, message: `the request body is not JSON: ${err.message}` })
    }
    const call = readCall(body)
    if (typeof call === 'string') return httpError({ code: ERROR_CODE.badRequest, message: call })
    if (signal.aborted) throw signal.reason

    const created = unixSeconds(Date.now())
    const stream = mux.chat({ model: call.model, messages: call.messages, params: call.params })
    const meta = { id: stream.id, created, model: call.model }
    const cancel = () => stream.cancel()
    if (!call.stream) {
      let result
      try {
        result = await untilAborted(stream.result, signal, cancel)
      } catch (err) {
        if (err === signal.reason && signal.aborted) throw err
        return failed(err, stream.id)
      }
      return new Response(JSON.stringify(completion(meta, result)), {
        status: 200,
        headers: [['content-type', 'application/json'], ['x-request-id', stream.id]],
      })
    }

    const encoder = new ChunkEncoder({ ...meta, includeUsage: call.includeUsage })
    const parts = stream.parts()
    let first
    try {
      first = await untilAborted(parts.next(), signal, cancel)
      if (first.done) first = { end: encoder.done(await stream.result) }
      else first = { event: encoder.part(first.value) }
    } catch (err) {
      if (err === signal.reason && signal.aborted) throw err
      return failed(err, stream.id)
    }
    return new Response(eventStream(stream, parts, encoder, signal, first), {
      status: 200,
      headers: [
        ['content-type', 'text/event-stream; charset=utf-8'],
        ['cache-control', 'no-cache'],
        ['x-request-id', stream.id],
      ],
    })
  }
}

/**
 * How `POST …/chat/completions` reaches the gateway:
 * - `websocket`: always as a stream on the tab's shared socket;
 * - `http`: always as the gateway's own `POST /v1/chat/completions` (same bytes, see
 *   docs/openai-compat.md), for networks whose proxies block WebSockets;
 * - `auto` (the default): the socket, unless it cannot connect at all: this tab has never
 *   seen it open (no `welcome` since `connect()`, in this tab or its leader) and its last
 *   attempt failed (status `reconnecting`). Then the call goes over HTTP; once the socket has
 *   been open, a drop is a reconnect that resumes the streams, and calls keep to the socket.
 */
export const TRANSPORT = Object.freeze({ auto: 'auto', websocket: 'websocket', http: 'http' })

/**
 * The call as the gateway's own endpoint answers it, with the Mux's token as the Bearer
 * (replacing the SDK's placeholder key) and the caller's signal: an abort closes the request,
 * which the gateway takes as a cancel. The gateway's answer is returned as is.
 * @param {{httpUrl: (path: string) => string, httpToken: () => Promise<string>}} mux
 * @param {Request} request
 */
async function overHttp (mux, request) {
  const signal = request.signal
  if (signal.aborted) throw signal.reason
  const [token, body] = await Promise.all([mux.httpToken(), request.text()])
  if (signal.aborted) throw signal.reason
  const headers = new Headers(request.headers)
  headers.set('authorization', `Bearer ${token}`)
  headers.set('content-type', 'application/json')
  return globalThis.fetch(mux.httpUrl('chat/completions'), { method: 'POST', headers, body, signal })
}

/** `POST` to a path that ends in `/chat/completions` (any base URL, any query). */
function servesChatCompletions (request) {
  return request.method === 'POST' && /\/chat\/completions\/?$/.test(new URL(request.url).pathname)
}

/**
 * The request body as `mux.chat` takes it, or what is wrong with it. `model`, `messages`,
 * `stream` and `stream_options` are the SDK's framing; every other key goes upstream as a
 * parameter (the gateway refuses the ones its `allowed_params` does not list).
 * @param {unknown} body
 * @returns {{model: string, messages: object[], params: object, stream: boolean, includeUsage: boolean}|string}
 */
export function readCall (body) {
  if (!body || typeof body !== 'object' || Array.isArray(body)) return 'the request body must be a JSON object'
  const { model, messages, stream = false, stream_options: streamOptions, ...params } = body
  if (typeof model !== 'string' || !model) return '`model` must be a non-empty string'
  if (!Array.isArray(messages) || messages.length === 0) return '`messages` must be a non-empty array'
  if (typeof stream !== 'boolean') return '`stream` must be a boolean'
  if (streamOptions != null && (typeof streamOptions !== 'object' || Array.isArray(streamOptions))) {
    return '`stream_options` must be an object'
  }
  return { model, messages, params, stream, includeUsage: stream && streamOptions?.include_usage === true }
}

/**
 * Codes that mean the shim lost the stream on its way, not that anyone refused it: the page
 * closed the connection, the leader tab went with it, frames went missing, or (`not_found`,
 * which the gateway only says of a stream it no longer has) the gateway restarted.
 */
const LOST = new Set([CLIENT_ERROR_CODE.closed, CLIENT_ERROR_CODE.tabGone, CLIENT_ERROR_CODE.bufferFull,
  CLIENT_ERROR_CODE.sequenceGap, ERROR_CODE.notFound])

/** The stream failed before its first byte: an HTTP error, or a network error when lost. */
function failed (err, streamId) {
  if (!err || typeof err.code !== 'string') throw err
  if (LOST.has(err.code)) throw new TypeError('Failed to fetch', { cause: err })
  return httpError(err, streamId)
}

/** @param {object} error @param {string|null} [streamId] */
function httpError (error, streamId = null) {
  const { status, headers, body } = errorResponse(error, streamId)
  return new Response(body, { status, headers })
}

/** The 404 for what mux.fetch does not serve. @param {Request} request */
function notServed (request) {
  const path = new URL(request.url).pathname
  const message = /\/responses(\/|$)/.test(path)
    ? `${request.method} ${path}: muxgate serves the Chat Completions API, not the Responses API: ` +
      'use chat completions (with the AI SDK, `provider.chat(model)` instead of `provider(model)`)'
    : `${request.method} ${path}: mux.fetch serves POST …/chat/completions only ` +
      '(pass `fallback` to createFetch() to send other requests elsewhere)'
  return httpError({ code: ERROR_CODE.notFound, message })
}

/**
 * `promise`, or the signal's reason once it aborts (after `onAbort`).
 * @template T @param {Promise<T>} promise @param {AbortSignal} signal @param {() => void} onAbort
 * @returns {Promise<T>}
 */
function untilAborted (promise, signal, onAbort) {
  return new Promise((resolve, reject) => {
    const abort = () => {
      onAbort()
      reject(signal.reason)
    }
    if (signal.aborted) return abort()
    signal.addEventListener('abort', abort, { once: true })
    promise.then(
      (v) => { signal.removeEventListener('abort', abort); resolve(v) },
      (e) => { signal.removeEventListener('abort', abort); reject(e) })
  })
}

/**
 * The response body: the first event, then one event per part as the reader pulls, then the
 * end (`done`: finish, usage, `[DONE]`, closed at once; `error`: an error event, closed).
 * Aborting `signal` errors the body with its reason; cancelling the body cancels the stream.
 * @param {import('./stream.js').default} stream
 * @param {AsyncIterator<object>} parts
 * @param {ChunkEncoder} encoder
 * @param {AbortSignal} signal
 * @param {{event?: string, end?: string}} first
 */
function eventStream (stream, parts, encoder, signal, first) {
  const bytes = new TextEncoder()
  let controller
  let open = true
  const close = (how) => {
    if (!open) return
    open = false
    signal.removeEventListener('abort', onAbort)
    how()
  }
  const onAbort = () => close(() => {
    stream.cancel()
    controller.error(signal.reason)
  })
  const fail = err => close(() => {
    if (!err || typeof err.code !== 'string' || LOST.has(err.code)) {
      controller.error(new TypeError(`network error: ${err?.message ?? err}`, { cause: err }))
      return
    }
    controller.enqueue(bytes.encode(encoder.error(err)))
    controller.close()
  })
  return new ReadableStream({
    start (c) {
      controller = c
      if (first.end !== undefined) {
        c.enqueue(bytes.encode(first.end))
        open = false
        c.close()
        return
      }
      if (first.event) c.enqueue(bytes.encode(first.event))
      signal.addEventListener('abort', onAbort, { once: true })
      if (signal.aborted) onAbort()
    },
    async pull () {
      if (!open) return
      let next
      try {
        next = await parts.next()
        if (!open) return
        if (next.done) {
          const end = encoder.done(await stream.result)
          close(() => {
            controller.enqueue(bytes.encode(end))
            controller.close()
          })
          return
        }
      } catch (err) {
        fail(err)
        return
      }
      const event = encoder.part(next.value)
      if (event) controller.enqueue(bytes.encode(event))
    },
    cancel () {
      close(() => stream.cancel())
    },
  })
}
