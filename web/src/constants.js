/**
 * Every string and number of the muxgate wire protocol (v1) and of the cross-tab bus, in one
 * place. Mirrors the gateway's `src/protocol.rs` and `docs/protocol.md`; change both together.
 *
 * @example
 * import { FRAME, ERROR_CODE } from './constants.js'
 * if (frame.type === FRAME.error && frame.code === ERROR_CODE.rateLimited) wait(frame.retry_after_ms)
 */

/** The WebSocket subprotocol the gateway accepts. */
export const SUBPROTOCOL = 'muxgate.v1'

/** Sent in `hello.client`, for the gateway's logs. */
export const CLIENT_NAME = 'muxgate-js/0.1'

/** Default WebSocket path on the gateway's origin. */
export const WS_PATH = '/v1/ws'

/** Frame `type`s, client → server and server → client. */
export const FRAME = Object.freeze({
  // client → server
  hello: 'hello',
  open: 'open',
  cancel: 'cancel',
  ping: 'ping',
  /** a new token for the live connection (protocol extension `refresh`) */
  refresh: 'refresh',
  /** streams moved onto this welcomed connection (protocol extension `resume`) */
  resume: 'resume',
  // server → client
  welcome: 'welcome',
  queued: 'queued',
  start: 'start',
  delta: 'delta',
  done: 'done',
  error: 'error',
  goaway: 'goaway',
  pong: 'pong',
  /** answer to `refresh`: the connection now runs under the new token, until `exp` */
  refreshed: 'refreshed',
  /** answer to `resume`: the streams that will replay on this connection */
  resumed: 'resumed',
})

/**
 * `type`s of the parts `ChatStream.parts()` yields. One `delta` frame gives its parts in this
 * order: reasoning, refusal, text, then its tool-call fragments.
 */
export const PART = Object.freeze({
  reasoning: 'reasoning',
  refusal: 'refusal',
  text: 'text',
  /** one fragment of a tool call: `index`, `id`/`name` on the call's first fragment, `arguments` piece */
  toolCall: 'tool_call',
})

/** Protocol error codes (`error.code`). */
export const ERROR_CODE = Object.freeze({
  unauthorized: 'unauthorized',
  badRequest: 'bad_request',
  duplicateId: 'duplicate_id',
  notFound: 'not_found',
  tooManyStreams: 'too_many_streams',
  rateLimited: 'rate_limited',
  overloaded: 'overloaded',
  budgetExceeded: 'budget_exceeded',
  upstreamError: 'upstream_error',
  upstreamTimeout: 'upstream_timeout',
  cancelled: 'cancelled',
  internal: 'internal',
})

/**
 * Codes the shim itself raises; they never come from the gateway.
 * - `closed`: `mux.close()` or the page went away while the stream ran.
 * - `buffer_full`: too many streams waiting for a connection (see `sendBufferLimit`).
 * - `sequence_gap`: frames went missing and did not arrive in time; the text has a hole.
 * - `tab_gone`: the leader stopped hearing this tab and cancelled its streams.
 * - `too_many_connections`: the gateway refused this tab's socket (close 4429: the user has
 *   the tier's maximum of sockets open, e.g. tabs without BroadcastChannel). The shim does
 *   not retry by itself; the next `chat()` tries once more.
 */
export const CLIENT_ERROR_CODE = Object.freeze({
  closed: 'closed',
  bufferFull: 'buffer_full',
  sequenceGap: 'sequence_gap',
  tabGone: 'tab_gone',
  tooManyConnections: 'too_many_connections',
})

/**
 * WebSocket close codes the gateway uses, and what the shim does about each.
 * Anything not listed reconnects with backoff. The codes after which docs/protocol.md says
 * not to reconnect as is are in `NO_RECONNECT`.
 */
export const CLOSE_CODE = Object.freeze({
  /** Our own close, or the server's after ours. No reconnect. */
  normal: 1000,
  /** The gateway is shutting down: reconnect (elsewhere) and resume. */
  goingAway: 1001,
  /** The WebSocket framing was broken (RFC 6455). The shim's socket is the browser's: a bug, not a retry. */
  protocolError: 1002,
  /** No status (network loss, refused handshake): reconnect with backoff. */
  abnormal: 1006,
  /** A text frame was not valid UTF-8. */
  invalidPayload: 1007,
  /** A frame over the gateway's hard size limit (the shim checks `max_frame_bytes` first). */
  messageTooBig: 1009,
  /** Too many bad frames. The shim sent garbage; reconnecting unchanged would repeat it. */
  policy: 4400,
  /** No hello in time, bad or expired token: fetch a new token (if we can) and reconnect. */
  unauthorized: 4401,
  /** We read too slowly; nothing was lost: reconnect and resume. */
  slowConsumer: 4408,
  /** We stopped answering heartbeats: reconnect and resume. */
  heartbeatTimeout: 4409,
  /** The user already has the tier's maximum of sockets: no retry until another closes. */
  tooManyConnections: 4429,
  /** The shim closed the socket itself because its own heartbeat went unanswered. */
  clientHeartbeatTimeout: 4000,
})

/**
 * Close codes that end reconnection: retrying unchanged would be refused again (4401 too,
 * when the token is a fixed string; with a token function the shim fetches a new one).
 */
export const NO_RECONNECT = Object.freeze(new Set([
  CLOSE_CODE.protocolError,
  CLOSE_CODE.invalidPayload,
  CLOSE_CODE.messageTooBig,
  CLOSE_CODE.policy,
  CLOSE_CODE.tooManyConnections,
]))

/** This tab's part in the sharing of one socket. */
export const ROLE = Object.freeze({
  /** Not decided yet (first milliseconds, or between leaders). */
  electing: 'electing',
  /** Owns the socket; carries every tab's streams. */
  leader: 'leader',
  /** Streams through the leader tab over BroadcastChannel. */
  follower: 'follower',
  /** No BroadcastChannel or Web Locks here: this tab has its own socket. */
  solo: 'solo',
  /** `close()` was called. */
  closed: 'closed',
})

/** The shared socket's state, as seen from any tab. */
export const CONNECTION = Object.freeze({
  idle: 'idle',
  connecting: 'connecting',
  open: 'open',
  /** Lost, or told to go away; waiting for the next attempt. */
  reconnecting: 'reconnecting',
  /** Closed for good (`close()`, or a token that cannot be renewed). */
  closed: 'closed',
})

/**
 * Messages between tabs (see bus.js). `from` is the sender's tab id; `to`, when present, the
 * one tab meant to read it: such messages go to that tab's inbox, the others to every tab.
 * A follower writes to the leader's inbox (`join`, `open`, `cancel`, `bye`, `ack`); the
 * leader writes frames and `pong` to one follower's inbox, and `claim`, `hb`, `resign`,
 * `conn_error` to every tab.
 */
export const BUS = Object.freeze({
  /**
   * leader → all: "I hold the lock now", with its epoch. Followers answer `join`: at once, or
   * with `table: true` (it resumed from the last leader's table) once the handover is over
   * for them, if that table listed all their streams.
   */
  claim: 'claim',
  /**
   * leader → all: periodic heartbeat with status and the roster. Followers answer `ack`,
   * except to one with `ack: false` when they hold their tab lock and told the leader so.
   */
  hb: 'hb',
  /**
   * follower → leader: answer to `hb` (the leader counts unanswered ones per tab); with
   * `lock: true`, "I hold my tab lock now" (the leader then watches it, see `tabLockName`).
   */
  ack: 'ack',
  /** follower → leader: "are you there?" when it has not heard a heartbeat for a while. */
  probe: 'probe',
  /** leader → follower: answer to `probe`. */
  pong: 'pong',
  /** follower → leader: "I am here, and these are my streams (last seq seen, open frame)". */
  join: 'join',
  /** follower → leader: open this stream for me. */
  open: 'open',
  /** follower → leader: cancel my stream. */
  cancel: 'cancel',
  /** follower → leader: my page is going away; cancel these streams. */
  bye: 'bye',
  /** leader → one follower (its inbox): a server frame of one of its streams (older shims). */
  frame: 'frame',
  /** leader → one follower (its inbox): server frames of its streams, in order, batched. */
  frames: 'frames',
  /** leader → one follower or all: a connection-level error (`id: null`). */
  connError: 'conn_error',
  /** leader → all: "I am stepping down", with the stream table the next leader resumes. */
  resign: 'resign',
  /**
   * leader → the head of its roster (its inbox), first thing when its page goes away, before
   * the work of stepping down: open the WebSocket you will most likely lead on now. A few
   * bytes to one tab, so the handshake starts before the `resign` (large, to every tab) is
   * read. Tabs that do not know it ignore it.
   */
  leaving: 'leaving',
})

/**
 * The bus protocol's version, in `claim`, `hb`, `pong` and `join` (absent: 1). Tabs of one
 * origin may run different shim versions during a deploy: from 2 on a tab reads its inbox, so
 * only tabs that said 2 are written to there; a version-1 tab still gets its messages on the
 * shared channel (addressed with `to`), as before.
 */
export const BUS_VERSION = 2

/** Defaults of `connect()` options, in milliseconds unless said otherwise. */
export const DEFAULTS = Object.freeze({
  /** First reconnect delay; doubles per failed attempt. */
  backoffBaseMs: 250,
  /** Longest reconnect delay. */
  backoffMaxMs: 5000,
  /** Streams that may wait for a connection before `chat()` fails with `buffer_full`. */
  sendBufferLimit: 64,
  /**
   * Cross-tab heartbeat period: each follower hears the leader once a period (on its inbox,
   * at its own phase, see `tabHeartbeatSlots`). What it detects: a HUNG tab (alive, its locks
   * held, silent). Closed and crashed tabs are caught sooner, by locks: a dead leader's lock
   * goes to the next tab in its queue, a dead follower's tab lock to the leader.
   * - a hung leader: a follower counts a period without word from `tabHeartbeatMs` × 1¼–1½
   *   after the last one, probes from 2, and from `leaderMaxSilent` (4 periods, so 4¼–4½ s with
   *   the defaults) the first in line steals the lock after its stagger (`stealStaggerMs`);
   * - a hung follower: dropped after more than `tabMaxMissed` unanswered heartbeats, rounded up
   *   to `tabAckEvery` when it holds its tab lock: 5–8 s with the defaults.
   */
  tabHeartbeatMs: 1000,
  /**
   * The leader's heartbeat goes out in this many parts spread over the period, each to a
   * share of the followers, so that 30 tabs do not all wake (and ack) in the same instant.
   * 1: every follower at once.
   */
  tabHeartbeatSlots: 4,
  /** Heartbeats a follower may miss before the leader cancels its streams. */
  tabMaxMissed: 4,
  /**
   * A follower that holds its tab lock (see `tabLockName`) answers one heartbeat in this many:
   * its crash or close reaches the leader as the grant of that lock, so the acks are left only
   * to catch a tab that is alive but stuck (dropped once it has not answered for more than
   * `tabMaxMissed` heartbeats, rounded up to this many: 5–8 s with the defaults).
   */
  tabAckEvery: 4,
  /** Heartbeat periods without word from the leader before a follower takes over. */
  leaderMaxSilent: 4,
  /**
   * How long a new leader waits for the other tabs' `join` before it connects, when the last
   * leader left no stream table (it crashed or hung). After a clean `resign` it connects at once.
   */
  collectMs: 400,
  /**
   * Followers replace a silent leader one at a time: the n-th in the leader's roster waits
   * n × this (plus jitter) and checks that nobody took over before it steals the lock.
   */
  stealStaggerMs: 500,
  /**
   * The first follower of a resigning leader's roster opens a WebSocket at once, before the
   * lock reaches it, so the handshake overlaps the handover; unused after this long (another
   * tab got the lock), it is closed. Below the gateway's hello timeout (5 s by default).
   */
  warmSocketMs: 2000,
  /**
   * The follower next in line to lead holds a second, welcomed connection (a standby), so a
   * handover needs no handshake: the new leader sends `resume` on it. Off by default: it costs
   * a second connection per multi-tab user (one of its `max_connections`), where the product's
   * promise is one; the warm socket above applies either way.
   */
  standby: false,
  /** After the gateway refused a standby (4429, or a cap under 3), none is tried for this long. */
  standbyRetryMs: 60000,
  /**
   * During a clean handover a tab's `status` events are held back for up to this long (the
   * new leader's, until its hello is out; a follower's, until the new leader's frames or word
   * that its socket is open), so the page sees one change, not a "reconnecting" that lasts a
   * blink, and 30 tabs do not re-render three times while the next leader needs the CPU.
   * `status()` is current throughout. 0: every change at once.
   */
  handoverQuietMs: 250,
  /** A hidden leader is replaced by a visible follower after this long. */
  preferVisibleMs: 5000,
  /** Socket ping period until `welcome.heartbeat_ms` says otherwise. */
  heartbeatMs: 15000,
  /** A token function is called again when its token has less than this left. */
  tokenRefreshSkewMs: 30000,
  /** Out-of-order frames one stream holds while waiting for a missing `seq`. */
  maxHeldFrames: 1024,
  /** How long a stream's last frame may wait for missing earlier ones before `sequence_gap`. */
  gapTimeoutMs: 5000,
  /** Ended stream ids the leader remembers, to drop their late frames quietly. */
  tombstoneLimit: 1024,
})
