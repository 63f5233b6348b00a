import {
  CLIENT_ERROR_CODE, CLIENT_NAME, CLOSE_CODE, CONNECTION, DEFAULTS, ERROR_CODE, FRAME, NO_RECONNECT, SUBPROTOCOL,
} from './constants.js'
import MuxError from './errors.js'
import Timer, { backoffDelay } from './timer.js'

/**
 * Seconds-since-epoch `exp` of a JWT, or null when the token is not a readable JWT.
 * @param {string} token
 * @returns {number|null}
 */
export function jwtExpiry (token) {
  const part = typeof token === 'string' ? token.split('.')[1] : undefined
  if (!part) return null
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/')
    const json = JSON.parse(atob(b64 + '='.repeat((4 - b64.length % 4) % 4)))
    return typeof json.exp === 'number' ? json.exp : null
  } catch {
    return null
  }
}

/**
 * Opens a WebSocket to `url` without saying anything on it yet: `hello` goes out once a
 * Socket takes it (option `warm`). Until then the gateway counts it as nothing (a connection
 * is registered at `hello`), and closes it after its hello timeout if it is never used.
 * @param {typeof WebSocket} WS @param {string} url
 * @returns {WebSocket|null}
 */
export function openWarm (WS, url) {
  try {
    const ws = new WS(url, SUBPROTOCOL)
    ws.onerror = () => {} // a close event follows; whoever takes it sets the handlers
    return ws
  } catch {
    return null // the Socket's own attempt reports a bad URL
  }
}

/** Closes a warm WebSocket nobody took. @param {WebSocket|null} ws */
export function closeWarm (ws) {
  if (!ws) return
  ws.onopen = ws.onmessage = ws.onclose = null
  try { ws.close(CLOSE_CODE.normal, 'not needed') } catch {}
}

/**
 * @typedef {object} SocketHooks
 * @property {() => Array<{id: string, after: number}>} resume  streams to resume, asked at each hello
 * @property {(frame: any) => void} onWelcome
 * @property {(frame: any) => void} onFrame  every other server frame (streams, connection errors)
 * @property {() => void} [onBatchEnd]  the frames of one batched message were all given to
 *   `onFrame` (only on a connection welcomed with `batch`): what they routed can go out now
 * @property {(state: string) => void} onState
 * @property {(error: MuxError) => void} onFatal  the socket gave up (token refused, or a close
 *   code after which the gateway says not to reconnect: 1002, 1007, 1009, 4400, 4429); `connect()` tries again
 */

/**
 * The one WebSocket to the gateway: `hello` with a fresh token and the streams to resume,
 * heartbeats that notice a dead connection, reconnects with backoff and jitter, and `goaway`.
 *
 * On `goaway` the old connection is kept: it goes on carrying the streams it has (the gateway
 * drains them) while a new connection is opened; once that one is welcomed, its `resume` has
 * moved the streams over and the old one is closed. New streams wait for the new connection.
 * Nothing is buffered here: whoever owns the socket keeps its streams' state and sends when
 * `send()` says the socket is ready (see Router).
 *
 * With a token function, the token is renewed on the live connection: `tokenRefreshSkewMs`
 * before it expires the function is called and its token sent in a `refresh` frame. A gateway
 * that refuses it (`unauthorized`), or does not know `refresh` (`bad_request`), gets a new
 * connection with the new token instead, which resumes the streams as on `goaway`.
 *
 * @example
 * const socket = new Socket('wss://gw.example/v1/ws', {
 *   token: () => fetch('/token').then(r => r.text()),
 *   resume: () => router.resumeList(),
 *   onWelcome, onFrame, onState, onFatal,
 * })
 * socket.connect()
 * socket.send({ type: 'open', id: 'k3f9:1', model, messages }) // false until welcomed
 */
export default class Socket {
  /**
   * @param {string} url
   * @param {SocketHooks & {token: string|(() => string|Promise<string>), WebSocket?: typeof WebSocket,
   *   backoffBaseMs?: number, backoffMaxMs?: number, heartbeatMs?: number, tokenRefreshSkewMs?: number,
   *   random?: () => number}} opts
   */
  constructor (url, opts) {
    this.url = url
    this.token = opts.token
    this.WebSocket = opts.WebSocket ?? globalThis.WebSocket
    this.hooks = opts
    this.heartbeatMs = opts.heartbeatMs ?? DEFAULTS.heartbeatMs
    this.tokenRefreshSkewMs = opts.tokenRefreshSkewMs ?? DEFAULTS.tokenRefreshSkewMs
    this.random = opts.random ?? Math.random
    this.state = CONNECTION.idle
    /** The connection new frames go to. */
    this.conn = null
    /** A connection told to go away, still delivering its streams until the new one is up. */
    this.old = null
    this.stopped = true
    /** Bumped per attempt, so a token that arrives after `disconnect()` is not used. */
    this.attempt = 0
    this.cachedToken = null
    this.cachedExpiry = null
    /** The token function's call in flight, if any. */
    this.pendingToken = null
    /**
     * Within one message of a batched connection: `onBatchEnd` follows its last frame, so
     * what its frames route need not wait for a task of its own.
     */
    this.delivering = false
    /** Limits from `welcome`. */
    this.limits = {}
    /** Unix seconds at which the live connection's token expires, if known. */
    this.expiry = null
    this.refreshTimer = undefined
    /**
     * A WebSocket opened before this Socket existed (a follower that expected to lead next
     * opened it when the leader resigned), so the handshake ran while the lock was on its way.
     * The first `open()` sends its hello on it instead of opening another.
     */
    this.warm = opts.warm ?? null
    /**
     * A connection another part of this tab already welcomed (see Standby): the first
     * `open()` moves the streams onto it with a `resume` frame instead of a new handshake.
     */
    this.standby = opts.standby ?? null
    const backoff = { baseMs: opts.backoffBaseMs, maxMs: opts.backoffMaxMs }
    this.reconnectTimer = new Timer(() => this.open(), tries => backoffDelay(tries, backoff, this.random))
  }

  /** Whether `send()` would put a frame on the wire now. */
  get ready () {
    return !!this.conn && this.conn.welcomed && this.conn.ws.readyState === 1
  }

  /** Starts connecting (and reconnecting, until `disconnect()`). */
  connect () {
    if (!this.stopped) return
    this.stopped = false
    this.open()
  }

  /** Closes for good. */
  disconnect (code = CLOSE_CODE.normal, reason = 'client closed') {
    this.stopped = true
    this.attempt++
    this.reconnectTimer.cancel()
    this.stopRefresh()
    closeWarm(this.takeWarm())
    closeWarm(this.takeStandby()?.ws ?? null)
    for (const rec of [this.conn, this.old]) if (rec) this.drop(rec, code, reason)
    this.conn = null
    this.old = null
    this.setState(CONNECTION.closed)
  }

  /** Opens a new connection now (e.g. to resume streams another tab reported) and lets
   * the current one drain, as on `goaway`. */
  renew () {
    if (this.stopped) return
    if (this.conn && this.conn.welcomed) {
      this.retire(this.conn)
      this.open()
    }
  }

  /** Reconnects at once if waiting for the next attempt (page back online or in view). */
  reconnectNow () {
    if (this.stopped || this.conn) return
    if (this.reconnectTimer.pending) this.reconnectTimer.fireNow()
  }

  /**
   * @param {object} frame
   * @returns {boolean} true when written to an open, welcomed connection
   */
  send (frame) {
    if (!this.ready) return false
    this.conn.ws.send(JSON.stringify(frame))
    return true
  }

  async open () {
    if (this.stopped || this.conn) return
    const standby = this.takeStandby()
    if (standby) {
      this.adopt(standby)
      return
    }
    const attempt = ++this.attempt
    this.setState(this.everWelcomed ? CONNECTION.reconnecting : CONNECTION.connecting)
    let token
    try {
      token = await this.getToken()
    } catch (err) {
      if (attempt !== this.attempt || this.stopped) return
      this.reconnectTimer.scheduleTimeout()
      return
    }
    if (attempt !== this.attempt || this.stopped || this.conn) return
    let ws = this.takeWarm()
    try {
      ws ??= new this.WebSocket(this.url, SUBPROTOCOL)
    } catch (err) {
      // A malformed URL: retrying will not fix it.
      this.stopped = true
      this.setState(CONNECTION.closed)
      this.hooks.onFatal(new MuxError(ERROR_CODE.badRequest, `cannot open ${this.url}: ${err.message}`))
      return
    }
    const rec = { ws, token, welcomed: false, batch: false, pingTimer: undefined, pendingPing: null, refreshing: null, lastError: null }
    this.conn = rec
    const hello = () => {
      // batch: the gateway may pack the frames of one write into a JSON array (one message,
      // one task here, instead of one per frame); an older gateway ignores the field
      ws.send(JSON.stringify({ type: FRAME.hello, token, client: CLIENT_NAME, resume: this.hooks.resume(), batch: true }))
    }
    if (ws.readyState === 1) hello()
    else ws.onopen = hello
    ws.onmessage = (event) => this.onMessage(rec, event.data)
    ws.onclose = (event) => this.onClose(rec, event.code, event.reason)
    ws.onerror = () => {} // a close event follows
  }

  /** The standby connection if still open (else closes it), and forgets it. */
  takeStandby () {
    const standby = this.standby
    this.standby = null
    if (!standby) return null
    if (standby.ws.readyState === 1) return standby
    closeWarm(standby.ws)
    return null
  }

  /**
   * Takes a welcomed connection over: `resume` asks for every stream at once, and its answer
   * (`resumed`) stands for the `welcome` of a new connection.
   * @param {{ws: WebSocket, token: string, welcome: any}} standby
   */
  adopt ({ ws, token, welcome }) {
    this.attempt++
    this.setState(this.everWelcomed ? CONNECTION.reconnecting : CONNECTION.connecting)
    const rec = { ws, token, welcomed: false, batch: welcome.batch === true, resuming: welcome, pingTimer: undefined, pendingPing: null, refreshing: null, lastError: null }
    this.conn = rec
    ws.onmessage = (event) => this.onMessage(rec, event.data)
    ws.onclose = (event) => this.onClose(rec, event.code, event.reason)
    ws.onerror = () => {}
    ws.send(JSON.stringify({ type: FRAME.resume, resume: this.hooks.resume() }))
  }

  /** A `resume` was not answered with `resumed` (an older gateway): say hello on a new socket. */
  abandonResume (rec) {
    rec.resuming = null
    this.drop(rec, CLOSE_CODE.normal, 'resume not supported')
    if (this.conn === rec) this.conn = null
    this.open()
  }

  /** The warm WebSocket if it may still open (else closes it), and forgets it. */
  takeWarm () {
    const ws = this.warm
    this.warm = null
    if (!ws) return null
    if (ws.readyState <= 1) return ws
    closeWarm(ws)
    return null
  }

  /**
   * One WebSocket message: a frame, or (on a connection welcomed with `batch`) an array of
   * frames in the order the gateway wrote them.
   * @param {any} rec @param {string} data
   */
  onMessage (rec, data) {
    let parsed
    try {
      parsed = JSON.parse(data)
    } catch {
      return
    }
    const array = Array.isArray(parsed)
    const frames = array ? parsed : [parsed]
    const batch = array || rec.batch
    this.delivering = batch
    try {
      for (const frame of frames) this.onServerFrame(rec, frame)
    } finally {
      this.delivering = false
      if (batch) this.hooks.onBatchEnd?.()
    }
  }

  /** @param {any} rec @param {any} frame */
  onServerFrame (rec, frame) {
    if (!frame || typeof frame.type !== 'string') return
    switch (frame.type) {
      case FRAME.welcome:
        if (rec !== this.conn || rec.resuming) return
        this.onWelcomed(rec, frame)
        return
      case FRAME.resumed:
        if (rec !== this.conn || !rec.resuming) return
        this.onWelcomed(rec, { ...rec.resuming, resumed: Array.isArray(frame.resumed) ? frame.resumed : [] })
        return
      case FRAME.pong:
        rec.pendingPing = null
        return
      case FRAME.refreshed:
        if (rec !== this.conn || !rec.refreshing) return
        this.expiry = typeof frame.exp === 'number' ? frame.exp : jwtExpiry(rec.refreshing)
        rec.token = rec.refreshing
        rec.refreshing = null
        this.scheduleRefresh()
        return
      case FRAME.goaway:
        if (rec !== this.conn) return
        this.retire(rec)
        // "reconnect within reconnect_after_ms": spread the clients of one gateway over it
        this.reconnectTimer.scheduleTimeout(Math.round(this.random() * (frame.reconnect_after_ms ?? 0)))
        return
      case FRAME.error:
        if (frame.id === null || frame.id === undefined) {
          rec.lastError = frame
          if (rec.resuming && rec === this.conn) {
            // `bad_request` from a gateway without `resume`, or `overloaded` from one draining
            this.abandonResume(rec)
            return
          }
          if (rec.refreshing && (frame.code === ERROR_CODE.unauthorized || frame.code === ERROR_CODE.badRequest)) {
            // the answer to our `refresh`: refused, or a gateway without `refresh`. The new
            // token is cached; a new connection with it takes the streams over.
            rec.refreshing = null
            if (rec === this.conn) this.renew()
            return
          }
        }
        this.hooks.onFrame(frame)
        return
      default:
        this.hooks.onFrame(frame)
    }
  }

  /** `rec` is welcomed (or its `resume` answered): streams may go out on it. */
  onWelcomed (rec, frame) {
    rec.welcomed = true
    rec.batch = frame.batch === true
    this.everWelcomed = true
    this.reconnectTimer.reset()
    this.limits = frame.limits ?? {}
    this.expiry = typeof frame.exp === 'number' ? frame.exp : jwtExpiry(rec.token)
    this.scheduleRefresh()
    if (typeof frame.heartbeat_ms === 'number' && frame.heartbeat_ms > 0) this.heartbeatMs = frame.heartbeat_ms
    this.startHeartbeat(rec)
    if (this.old) {
      // the new connection's resume took the streams over
      this.drop(this.old, CLOSE_CODE.normal, 'resumed on a new connection')
      this.old = null
    }
    this.setState(CONNECTION.open)
    this.hooks.onWelcome(frame)
  }

  /** Arms the timer that renews the token before it expires (token functions only). */
  scheduleRefresh () {
    this.stopRefresh()
    if (typeof this.token !== 'function' || this.expiry === null || this.stopped) return
    // at least a second between attempts, so a function that keeps returning a token close
    // to expiry does not spin
    const delay = Math.max(1000, this.expiry * 1000 - Date.now() - this.tokenRefreshSkewMs)
    this.refreshTimer = setTimeout(() => this.refresh(), delay)
  }

  stopRefresh () {
    clearTimeout(this.refreshTimer)
    this.refreshTimer = undefined
  }

  /** Sends a fresh token on the live connection (`refresh`). */
  async refresh () {
    const rec = this.conn
    if (!rec || !this.ready || rec.refreshing) return
    let token
    try {
      token = await this.getToken()
    } catch {
      if (rec === this.conn) this.scheduleRefresh()
      return
    }
    if (rec !== this.conn || !this.ready) return
    const exp = jwtExpiry(token)
    if (token === rec.token || (exp !== null && this.expiry !== null && exp <= this.expiry)) {
      // nothing newer yet: ask again later, before the gateway's grace runs out
      this.scheduleRefresh()
      return
    }
    rec.refreshing = token
    this.send({ type: FRAME.refresh, token })
  }

  /** Moves `rec` aside as the draining connection; no new frames go to it. */
  retire (rec) {
    if (this.old && this.old !== rec) this.drop(this.old, CLOSE_CODE.normal, 'replaced')
    this.old = rec
    if (this.conn === rec) this.conn = null
    this.setState(CONNECTION.reconnecting)
  }

  /** @param {any} rec @param {number} code @param {string} reason */
  onClose (rec, code, reason) {
    this.stopHeartbeat(rec)
    if (rec === this.old) {
      this.old = null
      return
    }
    if (rec !== this.conn) return
    if (rec.resuming && !this.stopped) {
      // the standby died before it was answered: no reason to wait before a new socket
      this.conn = null
      this.open()
      return
    }
    this.conn = null
    this.stopRefresh()
    if (this.stopped) {
      this.setState(CONNECTION.closed)
      return
    }
    const said = rec.lastError?.message
    if (NO_RECONNECT.has(code)) {
      const error = code === CLOSE_CODE.tooManyConnections
        ? new MuxError(CLIENT_ERROR_CODE.tooManyConnections,
          `the gateway refused another connection for this user: ${said || reason || 'too many connections'}; close another tab or window of this site and try again`)
        : new MuxError(ERROR_CODE.badRequest, `the gateway closed the connection for bad frames (${code}): ${said || reason || 'policy violation'}`)
      this.giveUp(error)
      return
    }
    if (code === CLOSE_CODE.unauthorized) {
      this.cachedToken = null
      if (typeof this.token !== 'function') {
        this.giveUp(new MuxError(ERROR_CODE.unauthorized, said || reason || 'the gateway refused the token'))
        return
      }
    }
    this.setState(CONNECTION.reconnecting)
    this.reconnectTimer.scheduleTimeout()
  }

  /** Stops reconnecting and says why; `connect()` starts again. @param {MuxError} error */
  giveUp (error) {
    this.stopped = true
    this.reconnectTimer.cancel()
    this.stopRefresh()
    this.setState(CONNECTION.closed)
    this.hooks.onFatal(error)
  }

  /** Closes `rec` without hearing about it again. */
  drop (rec, code, reason) {
    this.stopHeartbeat(rec)
    const ws = rec.ws
    ws.onopen = ws.onmessage = ws.onclose = null
    ws.onerror = () => {}
    try {
      ws.close(code, reason)
    } catch {
      try { ws.close() } catch {}
    }
  }

  startHeartbeat (rec) {
    this.stopHeartbeat(rec)
    rec.pingTimer = setInterval(() => {
      if (rec.pendingPing !== null) {
        // the last ping got no pong within a whole period: the connection is dead
        this.drop(rec, CLOSE_CODE.clientHeartbeatTimeout, 'heartbeat timeout')
        this.onClose(rec, CLOSE_CODE.clientHeartbeatTimeout, 'heartbeat timeout')
        return
      }
      rec.pendingPing = Date.now()
      try {
        rec.ws.send(JSON.stringify({ type: FRAME.ping, ts: rec.pendingPing }))
      } catch {}
    }, this.heartbeatMs)
  }

  stopHeartbeat (rec) {
    clearInterval(rec.pingTimer)
    rec.pingTimer = undefined
  }

  /**
   * Takes a token function's token that another tab got (the last leader's), so the first
   * hello need not wait for the function. Ignored unless it is a JWT far enough from expiry.
   * @param {string|undefined} token
   */
  seedToken (token) {
    if (typeof this.token !== 'function' || typeof token !== 'string' || this.cachedToken) return
    const exp = jwtExpiry(token)
    if (exp === null || exp * 1000 - Date.now() <= this.tokenRefreshSkewMs) return
    this.cachedToken = token
    this.cachedExpiry = exp
  }

  /** The token for the next hello: the string given, or the function's, renewed near expiry. */
  async getToken () {
    if (typeof this.token !== 'function') return this.token
    const now = Date.now()
    if (this.cachedToken && this.cachedExpiry !== null && this.cachedExpiry * 1000 - now > this.tokenRefreshSkewMs) {
      return this.cachedToken
    }
    // one call of the function at a time: a prefetch and the hello that follows share it
    this.pendingToken ??= (async () => {
      try {
        const token = await this.token()
        if (typeof token !== 'string' || token === '') throw new MuxError(ERROR_CODE.unauthorized, 'the token function returned no token')
        this.cachedToken = token
        this.cachedExpiry = jwtExpiry(token)
        return token
      } finally {
        this.pendingToken = null
      }
    })()
    return this.pendingToken
  }

  /** Starts getting the token now (a new leader does while it collects the tabs' streams). */
  prefetchToken () {
    this.getToken().catch(() => {}) // the hello's own call reports a failure
  }

  /** @param {string} state */
  setState (state) {
    if (this.state === state) return
    this.state = state
    this.hooks.onState(state)
  }
}
