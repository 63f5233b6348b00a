// Type declarations for the muxgate browser shim (ES modules, no build step).
//
// @example
// import { connect } from 'muxgate-web'
// const mux = connect({ url: '/v1/ws', token: async () => (await (await fetch('/dev/token')).json()).token })
// const answer = mux.chat({ model: 'deepseek-v3.2', messages: [{ role: 'user', content: 'hi' }] })
// for await (const text of answer) out.append(text)
// const { usage, finish_reason, cost_usd } = await answer.result
//
// // everything the model streams, tool calls and reasoning included:
// const call = mux.chat({ model, messages, params: { tools } })
// for await (const part of call.parts()) if (part.type === 'reasoning') thinking.append(part.text)
// const { toolCalls, reasoning, refusal } = await call.result

/** This tab's part in sharing the socket. */
export type Role = 'electing' | 'leader' | 'follower' | 'solo' | 'closed'

/** The shared socket's state, as seen from this tab. */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed'

/** Protocol error codes, then the shim's own. */
export type ErrorCode =
  | 'unauthorized' | 'bad_request' | 'duplicate_id' | 'not_found' | 'too_many_streams'
  | 'rate_limited' | 'overloaded' | 'budget_exceeded' | 'upstream_error' | 'upstream_timeout'
  | 'cancelled' | 'internal'
  | 'closed' | 'buffer_full' | 'sequence_gap' | 'tab_gone' | 'too_many_connections'

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | string
  /** null in an assistant message that only calls tools. */
  content: string | Array<Record<string, unknown>> | null
  /** An assistant message's calls, as `result.toolCalls` gives them. */
  tool_calls?: ToolCall[]
  /** A `tool` message: the call it answers. */
  tool_call_id?: string
  [key: string]: unknown
}

export interface ChatRequest {
  model: string
  messages: ChatMessage[]
  /** Passed to the upstream chat-completions call (the gateway refuses keys it does not allow). */
  params?: Record<string, unknown>
  /** Aborting it cancels the stream, like `cancel()`. */
  signal?: AbortSignal
}

/** The upstream's usage, every field it sent (only the three counts when `usage_estimated`). */
export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  /** Always present from a gateway that speaks issue 12's fields (computed when the upstream omits it). */
  total_tokens?: number
  prompt_tokens_details?: {
    /** Prompt tokens served from the provider's cache (priced at the model's `cached_input`). */
    cached_tokens?: number
    [key: string]: unknown
  }
  completion_tokens_details?: {
    /** Completion tokens spent on reasoning (counted in `completion_tokens`). */
    reasoning_tokens?: number
    [key: string]: unknown
  }
  [key: string]: unknown
}

/** A tool call of the answer, its fragments merged by `index`: the shape of a chat-completions message's `tool_calls`. */
export interface ToolCall {
  id: string
  /** `'function'` unless the upstream said otherwise. */
  type: 'function' | string
  function: {
    name: string
    /** The arguments JSON text exactly as the model wrote it (parse it yourself: it may be invalid). */
    arguments: string
  }
}

/** Token log-probabilities as the upstream sent them (`params.logprobs: true`). */
export interface Logprobs {
  content?: Array<Record<string, unknown>>
  refusal?: Array<Record<string, unknown>>
  [key: string]: unknown
}

/**
 * One piece of a streamed answer, from `ChatStream.parts()`. A `delta` gives its parts in the
 * order reasoning, refusal, text, tool calls.
 */
export type ChatPart =
  | { type: 'text', text: string, /** this delta's log-probabilities, when asked for */ logprobs?: Logprobs }
  | { type: 'reasoning', text: string }
  | { type: 'refusal', text: string, logprobs?: Logprobs }
  | {
    type: 'tool_call'
    /** Which call this fragment belongs to. */
    index: number
    /** On the call's first fragment. */
    id?: string
    /** On the call's first fragment. */
    name?: string
    /** This fragment's piece of the arguments JSON (often cut mid-token; join them, or read `result.toolCalls`). */
    arguments: string
  }

export interface ChatResult {
  usage: Usage | null
  finish_reason: 'stop' | 'length' | 'tool_calls' | 'content_filter' | string | null
  cost_usd: number | null
  /** The whole answer's text. */
  text: string
  /** The whole reasoning ('' when the model streamed none). */
  reasoning: string
  /** The whole refusal, or null when the model did not refuse. */
  refusal: string | null
  /** The answer's tool calls in `index` order ([] when none). */
  toolCalls: ToolCall[]
  /** The upstream's completion id (`chatcmpl-…`), when it sent one. */
  completion_id?: string
  system_fingerprint?: string
  /** True when the upstream sent no usage and the gateway counted the tokens. */
  usage_estimated?: boolean
  /** The model that answered, when a configured fallback served instead of the one asked for. */
  model?: string
  /** Every delta's log-probabilities, concatenated, when asked for. */
  logprobs?: Logprobs
}

/**
 * One streamed answer: iterate it for text deltas (parts without text yield nothing), or
 * `parts()` for everything. Use one of the two: reading either consumes the stream.
 * `break` cancels it.
 */
export interface ChatStream extends AsyncIterable<string> {
  /** `<tab id>:<n>`, the logical stream id on the wire. */
  readonly id: string
  /** 1-based position while the gateway queues it for an upstream slot, else null. */
  readonly position: number | null
  /** Last `seq` shown in this tab. */
  readonly lastSeq: number
  readonly ended: boolean
  /** Resolves when the answer is complete; rejects with a MuxError (code `cancelled` after `cancel()`). */
  readonly result: Promise<ChatResult>
  /** Every part of the answer as it streams: reasoning, refusal, text and tool-call fragments. */
  parts(): AsyncIterableIterator<ChatPart>
  /** Stops the answer; the gateway aborts the upstream request. The loop ends without throwing. */
  cancel(): void
}

export interface Status {
  tabId: string
  role: Role
  connection: ConnectionState
  /** Tabs sharing the one socket, this one included (1 when solo). */
  tabs: number
  /** This tab's live streams. */
  streams: number
  /** This tab's streams waiting for an upstream slot. */
  queue: Array<{ id: string, position: number }>
  user: string | null
  tier: string | null
}

export interface ConnectOptions {
  /** `ws(s)://…/v1/ws`, or a path resolved against the page (default `/v1/ws`). */
  url?: string
  /** A JWT, or a function returning one; called again before the last one expires and after a 4401. */
  token: string | (() => string | Promise<string>)
  /** Lock and channel name shared by the tabs (default `muxgate:<url>`). */
  name?: string
  backoffBaseMs?: number
  backoffMaxMs?: number
  /** Streams that may wait for a connection before `chat()` fails with `buffer_full` (default 64). */
  sendBufferLimit?: number
  /** Cross-tab heartbeat period (1000): a hung leader is replaced 4¼–4½ periods after its last word. */
  tabHeartbeatMs?: number
  /** The leader's heartbeat goes out in this many parts over the period, each to a share of the followers (4). */
  tabHeartbeatSlots?: number
  tabMaxMissed?: number
  /** A follower holding its tab lock answers one heartbeat in this many (4). */
  tabAckEvery?: number
  leaderMaxSilent?: number
  /** When the last leader left no stream table: wait this long for the tabs' joins (400). */
  collectMs?: number
  /** A silent leader is replaced by the n-th follower after n × this (default 500). */
  stealStaggerMs?: number
  /** A WebSocket opened ahead of a handover and not said hello on is closed after this (2000). */
  warmSocketMs?: number
  /** The follower next in line to lead holds a second, welcomed connection, so a handover
   * resumes on it with no handshake: one extra idle connection per multi-tab user (default
   * false). */
  standby?: boolean
  /** After the gateway refused a standby (4429, or `max_connections` under 3), none is
   * tried for this long (default 60000). */
  standbyRetryMs?: number
  /** During a clean handover, `status` events wait up to this long for its end, so the page
   * sees one change (default 250; 0: every change at once). `status()` is always current. */
  handoverQuietMs?: number
  preferVisibleMs?: number
  heartbeatMs?: number
  /** A token function is called this long before its token expires, and the new token sent
   * on the live socket (`refresh`) (default 30000). */
  tokenRefreshSkewMs?: number
  maxHeldFrames?: number
  gapTimeoutMs?: number
  tombstoneLimit?: number
  /** For tests and non-browser runtimes: replacements for the browser globals. */
  WebSocket?: typeof WebSocket
  BroadcastChannel?: typeof BroadcastChannel | undefined
  locks?: LockManager | undefined
  window?: unknown
  document?: unknown
  tabId?: string
}

/** What an upstream's error body said; each field only when it said it. */
export interface UpstreamError {
  /** e.g. `invalid_request_error` */
  type?: string
  /** e.g. `context_length_exceeded` (a numeric code as its decimal string) */
  code?: string
  /** e.g. `messages` */
  param?: string
}

export class MuxError extends Error {
  constructor(code: ErrorCode | string, message?: string,
    details?: { id?: string | null, retryAfterMs?: number, status?: number, upstream?: UpstreamError })
  /** Builds the error an `error` frame (or `toJSON()`'s output) describes. */
  static fromFrame(frame: { code?: string, message?: string, id?: string | null, retry_after_ms?: number,
    status?: number, upstream?: UpstreamError }): MuxError
  /** The muxgate code (`upstream_error`, …); what the upstream said is in `upstream`. */
  readonly code: ErrorCode | string
  /** The stream this error is about, or null for the connection. */
  readonly id: string | null
  /** With `rate_limited`: when to try again. */
  readonly retryAfterMs?: number
  /** The upstream's HTTP status, when an upstream response caused the error. */
  readonly status?: number
  readonly upstream?: UpstreamError
  /** The error in the `error` frame's shape, for `postMessage`; `fromFrame` reads it back. */
  toJSON(): { code: string, message: string, id: string | null, retry_after_ms?: number, status?: number, upstream?: UpstreamError }
}

export class Mux {
  constructor(options: ConnectOptions)
  readonly tabId: string
  readonly role: Role
  readonly connection: ConnectionState
  readonly tabs: number
  /** Streams one answer. */
  chat(request: ChatRequest): ChatStream
  /** Subscribes; `status` fires at once with the current status. Returns an unsubscribe function. */
  on(event: 'status', fn: (status: Status) => void): () => void
  on(event: 'error', fn: (error: MuxError) => void): () => void
  status(): Status
  /** Ends this tab's streams (code `closed`) and hands the socket to another tab if it led. */
  close(): void
  /**
   * A `fetch` for OpenAI-compatible SDKs, bound: `POST …/chat/completions` (streaming or not)
   * becomes a stream on this tab's shared socket, answered in OpenAI's format
   * (docs/openai-compat.md); every other request gets a 404 in OpenAI's error shape.
   * @example
   * const client = new OpenAI({ baseURL: location.origin + '/v1', apiKey: 'muxgate',
   *                             dangerouslyAllowBrowser: true, fetch: mux.fetch })
   */
  readonly fetch: typeof fetch
  /** A `fetch` like `mux.fetch`, with options. */
  createFetch(options?: CreateFetchOptions): typeof fetch
  /** The socket cannot connect at all (never open since `connect()`, last attempt failed). */
  cannotConnect(): boolean
  /** The gateway's HTTP URL for `path` beside the WebSocket's (`wss://h/v1/ws` → `https://h/v1/<path>`). */
  httpUrl(path: string): string
  /** A token for an HTTP request, from `connect()`'s `token`. */
  httpToken(): Promise<string>
}

export interface CreateFetchOptions {
  /**
   * Serves every request that is not `POST …/chat/completions` (e.g. `globalThis.fetch` for
   * `GET /v1/models`), called with one `Request` built from the caller's input and init;
   * without it they get a 404 in OpenAI's error shape.
   */
  fallback?: typeof fetch
  /**
   * How `POST …/chat/completions` reaches the gateway. `'websocket'`: as a stream on the tab's
   * shared socket. `'http'`: as the gateway's own `POST /v1/chat/completions` (the same bytes;
   * the Bearer token from `connect()`'s `token`), for networks whose proxies block WebSockets.
   * `'auto'` (default): the socket, unless it cannot connect at all (never open since
   * `connect()`, and its last attempt failed): then over HTTP.
   */
  transport?: 'auto' | 'websocket' | 'http'
}

/** The HTTP answer to each error code (docs/openai-compat.md, "Errors as HTTP"). */
export const HTTP_ERROR: Readonly<Record<string, { status: number, type: string, retry: boolean }>>

/** Joins (or starts) the shared connection of this origin's tabs. */
export function connect(options: ConnectOptions): Mux

export const SUBPROTOCOL: 'muxgate.v1'
export const FRAME: Readonly<Record<string, string>>
export const ERROR_CODE: Readonly<Record<string, ErrorCode>>
export const CLIENT_ERROR_CODE: Readonly<Record<string, ErrorCode>>
export const CLOSE_CODE: Readonly<Record<string, number>>
export const ROLE: Readonly<Record<string, Role>>
export const CONNECTION: Readonly<Record<string, ConnectionState>>
export const DEFAULTS: Readonly<Record<string, number>>
