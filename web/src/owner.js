import { CLIENT_ERROR_CODE, ERROR_CODE, FRAME } from './constants.js'
import MuxError from './errors.js'
import Router from './router.js'
import Socket from './socket.js'

const UTF8 = typeof TextEncoder !== 'undefined' ? new TextEncoder() : null

/**
 * The socket owner's part, shared by a leader and a solo tab: the one WebSocket, and the
 * Router that sends each of its frames to the tab that owns the stream. It knows no other
 * tab: a frame for another tab goes to `forward` (the leader batches it to that tab's inbox;
 * a solo tab has no other tab), and the connection's news to `onChange` and
 * `onConnectionError` (a leader tells its followers).
 *
 * @example
 * const owner = new SocketOwner(mux, { forward: (tab, frame) => outbox(tab, frame) })
 * owner.connect()
 * owner.open(mux.tabId, { type: 'open', id: 'k3f9:1', model, messages })
 */
export default class SocketOwner {
  /**
   * @param {import('./mux.js').default} tab this tab's handle: its streams, options, status
   * @param {{forward?: (tab: string, frame: any) => void, onChange?: () => void,
   *   onConnectionError?: (error: MuxError) => void, onBatchEnd?: () => void, warm?: WebSocket|null,
   *   standby?: {ws: WebSocket, token: string, welcome: any}|null}} [hooks]
   *   warm: a WebSocket already opened for the first hello (see Socket); standby: a welcomed
   *   connection the first `resume` goes on instead (see Standby); onBatchEnd: the
   *   frames of one batched socket message were all routed (see Socket's `delivering`)
   */
  constructor (tab, { forward, onChange, onConnectionError, onBatchEnd, warm = null, standby = null } = {}) {
    this.tab = tab
    this.forward = forward ?? (() => {})
    this.onChange = onChange ?? (() => {})
    this.onConnectionError = onConnectionError ?? (() => {})
    /** Why the socket gave up for good (new streams fail at once), or null. */
    this.fatal = null
    /** Numbers the hellos, so `welcome` settles the streams of the hello it answers. */
    this.hello = 0
    /** A hello is out and not welcomed yet. */
    this.helloPending = false
    /** A tab reported less than that hello resumes from: resume again once welcomed. */
    this.renewOnWelcome = false
    this.router = new Router({ tombstoneLimit: tab.opts.tombstoneLimit })
    // this tab's streams opened while it had no socket (electing, or following no leader yet)
    for (const s of tab.streams.values()) {
      if (!s.ended) this.router.add(tab.tabId, s.openFrame, { lastSeq: s.lastSeq, sent: s.dispatched })
      s.dispatched = true
    }
    const opts = tab.opts
    this.socket = new Socket(tab.url, {
      token: tab.token,
      WebSocket: tab.env.WebSocket,
      backoffBaseMs: opts.backoffBaseMs,
      backoffMaxMs: opts.backoffMaxMs,
      heartbeatMs: opts.heartbeatMs,
      tokenRefreshSkewMs: opts.tokenRefreshSkewMs,
      warm,
      standby,
      resume: () => {
        this.helloPending = true
        this.renewOnWelcome = false
        return this.router.resumeList(++this.hello)
      },
      onWelcome: frame => this.onWelcome(frame),
      onFrame: frame => this.onServerFrame(frame),
      onBatchEnd,
      onState: state => { if (tab.setConnection(state)) this.onChange() },
      onFatal: error => this.onFatal(error),
    })
  }

  /** Whether frames go on the wire now. */
  get ready () {
    return this.socket.ready
  }

  connect () {
    this.socket.connect()
  }

  /** Closes the socket for good (the streams stay resumable at the gateway). */
  stop () {
    this.socket.disconnect()
  }

  /** A stream of this tab. @param {any} stream a ChatStream */
  dispatch (stream) {
    stream.dispatched = true
    this.open(this.tab.tabId, stream.openFrame)
  }

  /** @param {string[]} ids */
  cancelAll (ids) {
    for (const id of ids) this.cancel(id)
  }

  /** @param {string} tab @param {any} open a stream `tab` asks for */
  open (tab, open) {
    const router = this.router
    if (router.has(open.id) || router.tombstone(open.id)) return
    if (this.fatal) {
      if (this.fatal.code === CLIENT_ERROR_CODE.tooManyConnections) {
        // refused for the user's socket count: another tab may have closed since, try once
        // more (a new refusal fails this stream too, at once)
        this.fatal = null
        this.socket.connect()
      } else {
        // the socket gave up for good (a token it cannot renew): fail at once, don't queue
        this.deliverTo(tab, { type: FRAME.error, id: open.id, code: this.fatal.code, message: this.fatal.message })
        return
      }
    }
    if (!this.socket.ready && router.pendingCount() >= this.tab.opts.sendBufferLimit) {
      this.deliverTo(tab, {
        type: FRAME.error, id: open.id, code: CLIENT_ERROR_CODE.bufferFull,
        message: `${this.tab.opts.sendBufferLimit} streams are already waiting for the connection`,
      })
      return
    }
    router.add(tab, open)
    this.flushPending()
  }

  /** @param {string} id */
  cancel (id) {
    const route = this.router.get(id)
    if (!route) return
    if (!route.sent) {
      this.router.remove(id, 'ended')
      return
    }
    this.router.cancel(id)
    this.socket.send({ type: FRAME.cancel, id })
  }

  /** Sends the `open` of every stream not sent yet, if the socket is ready. */
  flushPending () {
    if (!this.socket.ready) return
    const max = this.socket.limits?.max_frame_bytes
    for (const route of this.router.pending()) {
      const json = JSON.stringify(route.open)
      const bytes = UTF8 ? UTF8.encode(json).length : json.length
      if (typeof max === 'number' && bytes > max) {
        // the gateway would answer with a connection error, not one for this stream
        this.router.remove(route.id, 'ended')
        this.deliverTo(route.tab, {
          type: FRAME.error, id: route.id, code: ERROR_CODE.badRequest,
          message: `the request is ${bytes} bytes, over the gateway's max_frame_bytes (${max})`,
        })
        continue
      }
      if (!this.socket.send(route.open)) return
      this.router.markSent(route.id)
    }
  }

  /**
   * A tab says it has shown less of `id` than was forwarded (it was frozen, or the last
   * leader's table was ahead of it): only a replay brings the rest back.
   * @param {string} id @param {number} after
   * @returns {boolean} whether a new hello must resume it now
   */
  rewind (id, after) {
    if (!this.router.rewind(id, after)) return false
    const route = this.router.get(id)
    if (!route.sent) return false
    if (this.socket.ready) return true
    if (this.helloPending && route.hello === this.hello) this.renewOnWelcome = true
    return false
  }

  /** Opens a new connection that resumes every stream; the current one drains. */
  renew () {
    this.socket.renew()
  }

  /** @param {any} frame */
  onWelcome (frame) {
    const tab = this.tab
    tab.user = frame.user ?? tab.user
    tab.tier = frame.tier ?? tab.tier
    const settled = this.router.afterWelcome(this.hello, frame.resumed ?? [])
    const { lost, cancel } = settled
    const renew = settled.renew || this.renewOnWelcome
    this.helloPending = false
    this.renewOnWelcome = false
    for (const route of lost) {
      this.deliverTo(route.tab, {
        type: FRAME.error, id: route.id, code: ERROR_CODE.notFound,
        message: 'the gateway no longer has this stream (it restarted, or the resume window ran out); the answer is incomplete',
      })
    }
    for (const route of cancel) this.socket.send({ type: FRAME.cancel, id: route.id })
    this.flushPending()
    if (renew) this.socket.renew()
    tab.emitStatus()
    this.onChange()
  }

  /** @param {any} frame */
  onServerFrame (frame) {
    if (frame.id === null || frame.id === undefined) {
      if (frame.type === FRAME.error) {
        const error = MuxError.fromFrame(frame)
        this.tab.emit('error', error)
        this.onConnectionError(error)
      }
      return
    }
    const routed = this.router.route(frame)
    if (routed) this.deliverTo(routed.tab, routed.frame)
  }

  /** @param {MuxError} error the socket gave up (token refused, or a no-reconnect close) */
  onFatal (error) {
    this.fatal = error
    this.tab.emit('error', error)
    this.onConnectionError(error)
    for (const route of this.router.clear('ended')) {
      this.deliverTo(route.tab, { type: FRAME.error, id: route.id, code: error.code, message: error.message })
    }
  }

  /** A frame for the tab that owns its stream: this tab's at once, another's to `forward`. */
  deliverTo (tab, frame) {
    if (tab === this.tab.tabId) this.tab.deliverLocal(frame)
    else this.forward(tab, frame)
  }
}
