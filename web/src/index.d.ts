// Type declarations for the muxgate browser shim (ES modules, no build step).
//
// @example
// import { connect } from 'muxgate-web'
// const mux = connect({ url: '/v1/ws', token: async () => (await (await fetch('/dev/token')).json()).token })
// const answer = mux.chat({ model: 'deepseek-v3.2', messages: [{ role: 'user', content: 'hi' }] })
// for await (const text of answer) out.append(text)
// const { usage, finish_reason, cost_usd } = await answer.result

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
  content: string | Array<Record<string, unknown>>
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

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  [key: string]: unknown
}

export interface ChatResult {
  usage: Usage | null
  finish_reason: string | null
  cost_usd: number | null
}

/** One streamed answer: iterate it for text deltas. `break` cancels it. */
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
  tabHeartbeatMs?: number
  tabMaxMissed?: number
  leaderMaxSilent?: number
  /** When the last leader left no stream table: wait this long for the tabs' joins (400). */
  collectMs?: number
  /** A silent leader is replaced by the n-th follower after n × this (default 500). */
  stealStaggerMs?: number
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

export class MuxError extends Error {
  constructor(code: ErrorCode | string, message?: string, details?: { id?: string | null, retryAfterMs?: number })
  readonly code: ErrorCode | string
  /** The stream this error is about, or null for the connection. */
  readonly id: string | null
  /** With `rate_limited`: when to try again. */
  readonly retryAfterMs?: number
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
}

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
