import { CLIENT_NAME, CLOSE_CODE, FRAME, NO_RECONNECT, SUBPROTOCOL } from './constants.js'

/**
 * A second connection to the gateway, welcomed and idle, held by the follower next in line
 * to lead. When that tab becomes leader its Socket takes the connection and moves every
 * stream onto it with one `resume` frame (protocol extension): no TCP or WebSocket handshake,
 * no token round trip, on the handover's critical path.
 *
 * It never pushes a real tab over the user's connection cap: a 4429 (or any close after which
 * the gateway says not to reconnect), or a `welcome.limits.max_connections` under 3 (the
 * leader, this, and room for one more window), makes it give up and report `refused`, and
 * the tab waits `standbyRetryMs` before another.
 */
export default class Standby {
  /**
   * @param {string} url
   * @param {{WebSocket: typeof WebSocket, token: string|(() => string|Promise<string>),
   *   onGone: (refused: boolean) => void}} opts onGone: it closed (refused: do not retry soon)
   */
  constructor (url, { WebSocket, token, onGone }) {
    this.url = url
    this.WS = WebSocket
    this.tokenOpt = token
    this.onGone = onGone
    this.ws = null
    this.token = null
    /** The `welcome` that answered its hello, once it came. */
    this.welcome = null
    this.pingTimer = undefined
    this.pendingPing = null
    this.closed = false
  }

  /** Welcomed and open: a Socket can take it. */
  get ready () {
    return !this.closed && !!this.welcome && this.ws?.readyState === 1
  }

  async open () {
    let token
    try {
      token = typeof this.tokenOpt === 'function' ? await this.tokenOpt() : this.tokenOpt
    } catch {
      token = null
    }
    if (this.closed) return
    if (typeof token !== 'string' || token === '') return this.gone(false)
    this.token = token
    let ws
    try {
      ws = new this.WS(this.url, SUBPROTOCOL)
    } catch {
      return this.gone(true)
    }
    this.ws = ws
    ws.onopen = () => ws.send(JSON.stringify({ type: FRAME.hello, token, client: CLIENT_NAME, resume: [], batch: true }))
    ws.onmessage = event => this.onMessage(event.data)
    ws.onclose = event => this.gone(NO_RECONNECT.has(event.code))
    ws.onerror = () => {}
  }

  /** @param {string} data */
  onMessage (data) {
    let frame
    try {
      frame = JSON.parse(data)
    } catch {
      return
    }
    if (!frame || Array.isArray(frame)) return
    if (frame.type === FRAME.welcome) {
      const cap = frame.limits?.max_connections
      if (typeof cap === 'number' && cap < 3) {
        // the leader and this would be the whole cap: leave it to the user's other windows
        this.close()
        this.onGone(true)
        return
      }
      this.welcome = frame
      const period = typeof frame.heartbeat_ms === 'number' && frame.heartbeat_ms > 0 ? frame.heartbeat_ms : 15000
      // the gateway drops a connection that says nothing for two of its heartbeats
      this.pingTimer = setInterval(() => this.ping(), period)
    } else if (frame.type === FRAME.pong) {
      this.pendingPing = null
    }
  }

  ping () {
    if (this.pendingPing !== null) {
      // no pong within a whole period: dead; the tab opens another
      this.close()
      this.onGone(false)
      return
    }
    this.pendingPing = Date.now()
    try { this.ws.send(JSON.stringify({ type: FRAME.ping, ts: this.pendingPing })) } catch {}
  }

  /** @param {boolean} refused */
  gone (refused) {
    if (this.closed) return
    this.closed = true
    clearInterval(this.pingTimer)
    this.onGone(refused)
  }

  /**
   * Hands the welcomed connection over (its handlers cleared) and forgets it.
   * @returns {{ws: WebSocket, token: string, welcome: any}|null}
   */
  take () {
    if (!this.ready) {
      this.close()
      return null
    }
    const taken = { ws: this.ws, token: this.token, welcome: this.welcome }
    clearInterval(this.pingTimer)
    this.closed = true
    this.ws.onopen = this.ws.onmessage = this.ws.onclose = null
    this.ws = null
    return taken
  }

  close () {
    clearInterval(this.pingTimer)
    this.closed = true
    const ws = this.ws
    this.ws = null
    if (!ws) return
    ws.onopen = ws.onmessage = ws.onclose = null
    try { ws.close(CLOSE_CODE.normal, 'standby not needed') } catch {}
  }
}
