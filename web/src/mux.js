import {
  BUS, BUS_VERSION, CLIENT_ERROR_CODE, CONNECTION, DEFAULTS, ERROR_CODE, FRAME, ROLE, WS_PATH,
} from './constants.js'
import Bus from './bus.js'
import Election from './election.js'
import MuxError from './errors.js'
import { makeTabId, streamId } from './ids.js'
import Roster from './roster.js'
import Router from './router.js'
import Socket, { closeWarm, openWarm } from './socket.js'
import ChatStream from './stream.js'

/**
 * Leader epochs order leaders: a higher one replaced a lower one. `n` is the time the tab
 * took the lock (ms since 1970), or one above the highest epoch it has heard if that is later,
 * so two tabs that take the lock one after the other without hearing of each other still get
 * epochs in the order of the lock (the tabs share one clock); the tab id breaks a tie.
 * @typedef {{n: number, tab: string}} Epoch
 */

/** @param {Epoch|null} a @param {Epoch|null} b */
export function compareEpochs (a, b) {
  if (!a || !b) return a ? 1 : b ? -1 : 0
  if (a.n !== b.n) return a.n < b.n ? -1 : 1
  return a.tab === b.tab ? 0 : a.tab < b.tab ? -1 : 1
}

/**
 * The epoch of a tab that takes the lock now, having heard epochs up to `heard`.
 * @param {number} heard @param {string} tab @param {number} [now]
 * @returns {Epoch}
 */
export function nextEpoch (heard, tab, now = Date.now()) {
  return { n: Math.max(heard + 1, now), tab }
}

const UTF8 = typeof TextEncoder !== 'undefined' ? new TextEncoder() : null

/**
 * @param {string|undefined} url
 * @param {any} location
 */
function resolveUrl (url, location) {
  if (url && /^wss?:\/\//.test(url)) return url
  if (!location) throw new TypeError('connect(): `url` must be a ws:// or wss:// URL outside a page')
  const base = new URL(url || WS_PATH, location.href)
  base.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:'
  return base.href
}

/**
 * One tab's handle on the shared connection. Every tab of an origin creates one; they
 * elect a leader (Web Locks) that owns the only WebSocket, and the others (followers) send
 * their streams through it over a BroadcastChannel. Where either API is missing each tab
 * has its own socket (role `solo`) behind the same API.
 *
 * Leader: owns the Socket, a Router (stream → owning tab, last seq) and a Roster (which
 * followers still answer). Follower: sends `open`/`cancel` to the leader, gets its own
 * streams' frames back, and reports its streams (with the last seq it has shown) to every
 * new leader, which resumes them. Every tab dedupes its own streams by seq (ChatStream).
 *
 * @example
 * import { connect } from '/src/index.js'
 * const mux = connect({ url: '/v1/ws', token: () => getToken() })
 * mux.on('status', s => console.log(s.role, s.connection, s.tabs))
 * const answer = mux.chat({ model: 'deepseek-v3.2', messages: [{ role: 'user', content: 'hi' }] })
 * for await (const text of answer) output.append(text)
 */
export default class Mux {
  /** @param {import('./index.js').ConnectOptions} options */
  constructor (options = {}) {
    const g = globalThis
    this.env = {
      WebSocket: options.WebSocket ?? g.WebSocket,
      BroadcastChannel: 'BroadcastChannel' in options ? options.BroadcastChannel : g.BroadcastChannel,
      locks: 'locks' in options ? options.locks : g.navigator?.locks,
      window: options.window ?? (typeof g.window !== 'undefined' ? g.window : null),
      document: options.document ?? (typeof g.document !== 'undefined' ? g.document : null),
    }
    if (!options.token) throw new TypeError('connect(): `token` (a string or a function) is required')
    this.url = resolveUrl(options.url, this.env.window?.location ?? g.location)
    this.token = options.token
    this.opts = { ...DEFAULTS }
    for (const key of Object.keys(DEFAULTS)) if (options[key] !== undefined) this.opts[key] = options[key]
    this.name = options.name ?? `muxgate:${this.url}`
    /** This tab's id, the prefix of its stream ids. */
    this.tabId = options.tabId ?? makeTabId()
    this.counter = 0
    /** @type {Map<string, ChatStream>} this tab's live streams */
    this.streams = new Map()
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map()
    this.role = ROLE.electing
    this.connection = CONNECTION.idle
    this.tabs = 1
    this.user = null
    this.tier = null
    this.lastStatus = ''
    /** Running: not closed, not hidden away in the bfcache. */
    this.running = false
    this.frozen = false
    this.shared = !!(this.env.BroadcastChannel && this.env.locks)

    // leader (and solo) state
    this.router = null
    this.roster = null
    this.socket = null
    this.epoch = null
    this.hbTimer = undefined
    /** While a new leader waits for the other tabs' streams: {expected: Set, timer, after}. */
    this.collecting = null
    this.hello = 0
    /** A hello is out and not welcomed yet. */
    this.helloPending = false
    /** A tab reported less than that hello resumes from: resume again once welcomed. */
    this.renewOnWelcome = false
    /** Frames per follower tab, posted together (one bus message per tab per task). */
    this.outbox = new Map()
    this.flushQueued = false
    /** Batches posted per follower tab while leading: a `join` says how many it has read. */
    this.posted = new Map()
    /** The last leader's `posted`, from its resign: {from, posted: {tab: n}}. */
    this.inherited = null
    /** Batches read per leader tab (the last few leaders), reported in `join`. */
    this.readFrom = new Map()

    // follower state
    this.leaderId = null
    this.leaderEpoch = null
    this.leaderVisible = true
    this.leaderHiddenSince = null
    this.silent = 0
    /** Counts every word heard from a leader, so a follower about to steal sees if one came. */
    this.heard = 0
    /** When this tab last sent a `join`. */
    this.joinedAt = 0
    this.followTimer = undefined
    this.stealTimer = undefined
    /** The roster the last leader announced: who a new leader waits for. */
    this.knownRoster = []
    /** The last leader's `resign`, if it stepped down cleanly. */
    this.lastResign = null
    /** Highest epoch seen, so a new leader's epoch is above every earlier one. */
    this.maxEpochN = 0
    /** The WebSocket this tab opened when the leader resigned, expecting to lead next. */
    this.warm = null
    this.warmTimer = undefined

    this.installLifecycle()
    this.start()
  }

  // ---------------------------------------------------------------- public API

  /**
   * Streams one answer. The returned stream is an async iterable of text deltas.
   * @param {{model: string, messages: Array<{role: string, content: any}>, params?: object, signal?: AbortSignal}} request
   * @returns {ChatStream}
   */
  chat ({ model, messages, params, signal } = {}) {
    if (typeof model !== 'string' || !model) throw new TypeError('chat(): `model` is required')
    if (!Array.isArray(messages) || messages.length === 0) throw new TypeError('chat(): `messages` must be a non-empty array')
    const id = streamId(this.tabId, ++this.counter)
    const open = { type: FRAME.open, id, model, messages }
    if (params && Object.keys(params).length > 0) open.params = params
    const stream = new ChatStream(id, open, {
      maxHeld: this.opts.maxHeldFrames,
      gapTimeoutMs: this.opts.gapTimeoutMs,
      onCancel: (sid) => this.cancelStream(sid),
      onChange: () => this.emitStatus(),
    })
    stream.dispatched = false
    if (this.role === ROLE.closed) {
      stream.fail(new MuxError(CLIENT_ERROR_CODE.closed, 'this connection was closed', { id }))
      return stream
    }
    this.streams.set(id, stream)
    if (signal) {
      if (signal.aborted) {
        stream.cancel()
        return stream
      }
      signal.addEventListener('abort', () => stream.cancel(), { once: true })
    }
    this.dispatch(stream)
    return stream
  }

  /**
   * @param {'status'|'error'} event
   * @param {(payload: any) => void} fn
   * @returns {() => void} unsubscribes
   */
  on (event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set())
    this.listeners.get(event).add(fn)
    if (event === 'status') fn(this.status())
    return () => this.listeners.get(event)?.delete(fn)
  }

  /** The current status (what `on('status')` reports). */
  status () {
    const queue = []
    for (const s of this.streams.values()) if (s.position !== null) queue.push({ id: s.id, position: s.position })
    return {
      tabId: this.tabId,
      role: this.role,
      connection: this.connection,
      tabs: this.tabs,
      streams: this.streams.size,
      queue,
      user: this.user,
      tier: this.tier,
    }
  }

  /** Ends this tab's streams (code `closed`), hands the socket to another tab if leader. */
  close () {
    if (this.role === ROLE.closed) return
    this.endOwnStreams(new MuxError(CLIENT_ERROR_CODE.closed, 'the connection was closed by the page'))
    this.suspend(true)
    this.removeLifecycle()
    this.setRole(ROLE.closed)
    this.connection = CONNECTION.closed
    this.emitStatus()
  }

  // ---------------------------------------------------------------- lifecycle

  start () {
    this.running = true
    this.frozen = false
    if (!this.shared) {
      this.setRole(ROLE.solo)
      this.tabs = 1
      this.startOwner()
      this.socket.connect()
      return
    }
    if (!this.bus) this.bus = new Bus(this.env.BroadcastChannel, this.name, this.tabId, m => this.onBus(m))
    this.bus.open()
    if (!this.election) {
      this.election = new Election(this.env.locks, this.name, {
        onElected: how => this.becomeLeader(how),
        onDeposed: () => this.stepDown({ handoff: true, rejoin: true }),
      })
    }
    this.elect()
  }

  elect () {
    this.setRole(ROLE.electing)
    this.election.tryAcquire().then((got) => {
      if (!got && this.running && !this.frozen && this.role === ROLE.electing) this.becomeFollower()
    })
  }

  /**
   * Stops taking part: on pagehide (`final`), close(), or freeze.
   * @param {boolean} final the page (or this Mux) is going away, not just pausing
   */
  suspend (final) {
    if (!this.running) return
    this.running = !final
    this.dropWarm()
    this.clearFollowerTimers()
    if (this.role === ROLE.leader) this.stepDown({ handoff: true, rejoin: false, leaving: final })
    if (this.role === ROLE.solo) this.stopOwner()
    this.election?.stop()
    if (final) {
      this.bus?.close()
      this.leaderId = null
      this.leaderEpoch = null
      this.connection = CONNECTION.idle
      if (this.role !== ROLE.closed) this.setRole(ROLE.electing)
    }
  }

  installLifecycle () {
    const win = this.env.window
    const doc = this.env.document
    this.lifecycle = []
    const on = (target, type, fn) => {
      if (!target?.addEventListener) return
      target.addEventListener(type, fn)
      this.lifecycle.push(() => target.removeEventListener(type, fn))
    }
    // Leaving (closed, navigated away, or into the bfcache): end our streams, hand the
    // socket over, and hold nothing that keeps the page out of the bfcache.
    on(win, 'pagehide', () => {
      if (this.role === ROLE.closed || !this.running) return
      this.endOwnStreams(new MuxError(CLIENT_ERROR_CODE.closed, 'the page was closed or navigated away'))
      this.suspend(true)
    })
    on(win, 'pageshow', (event) => {
      if (event.persisted && this.role !== ROLE.closed && !this.running) this.start()
    })
    // A frozen leader would hold the lock forever: hand over before the page stops.
    on(doc, 'freeze', () => {
      if (this.role === ROLE.closed || !this.running) return
      this.frozen = true
      if (this.role === ROLE.leader) {
        this.stepDown({ handoff: true, rejoin: false, leaving: false })
        this.election.stop()
        this.setRole(ROLE.electing)
      } else if (this.role === ROLE.follower) {
        this.clearFollowerTimers()
        this.election.stop()
      }
    })
    on(doc, 'resume', () => {
      if (!this.frozen || this.role === ROLE.closed || !this.running) return
      this.frozen = false
      if (this.role === ROLE.solo) this.socket?.reconnectNow()
      else if (this.role === ROLE.electing) this.elect()
      else if (this.role === ROLE.follower) this.becomeFollower()
    })
    on(doc, 'visibilitychange', () => {
      if (this.isVisible()) this.socket?.reconnectNow()
      if (this.role === ROLE.leader) this.broadcastStatus()
      if (this.role === ROLE.follower && this.leaderId) this.toLeader({ t: BUS.ack, visible: this.isVisible() })
    })
    on(win, 'online', () => this.socket?.reconnectNow())
  }

  removeLifecycle () {
    for (const off of this.lifecycle ?? []) off()
    this.lifecycle = []
  }

  isVisible () {
    return (this.env.document?.visibilityState ?? 'visible') === 'visible'
  }

  // ---------------------------------------------------------------- this tab's streams

  /** Hands a new stream to whoever carries it. @param {ChatStream} stream */
  dispatch (stream) {
    if (this.role === ROLE.leader || this.role === ROLE.solo) {
      stream.dispatched = true
      this.ownerOpen(this.tabId, stream.openFrame)
    } else if (this.role === ROLE.follower && this.leaderId) {
      stream.dispatched = true
      this.toLeader({ t: BUS.open, frame: stream.openFrame })
    }
    // else: no leader yet; the stream goes out with our `join` once one claims
  }

  /** @param {string} id */
  cancelStream (id) {
    this.streams.delete(id)
    this.emitStatus()
    if (this.role === ROLE.leader || this.role === ROLE.solo) this.ownerCancel(id)
    else if (this.role === ROLE.follower) this.toLeader({ t: BUS.cancel, id })
  }

  /** A follower's message for the leader: to its inbox when known, else to every tab. */
  toLeader (msg) {
    if (!this.leaderId) return this.bus.post(msg)
    return this.bus.post({ ...msg, to: this.leaderId }, { shared: !this.leaderReadsInbox })
  }

  /** The leader's message for one follower: to its inbox, or (older shim) the shared channel. */
  toTab (tab, msg) {
    if (this.inboxTabs?.has(tab)) return this.bus.post(msg, { keep: true })
    return this.bus.post(msg, { shared: true })
  }

  /** @param {MuxError} error */
  endOwnStreams (error) {
    const ids = [...this.streams.keys()]
    for (const s of this.streams.values()) {
      s.fail(new MuxError(error.code, error.message, { id: s.id }))
    }
    this.streams.clear()
    if (ids.length === 0) return
    if (this.router) for (const id of ids) this.ownerCancel(id)
    else if (this.role === ROLE.follower) this.toLeader({ t: BUS.bye, ids })
  }

  /** A frame for one of this tab's streams. @param {any} frame */
  deliverLocal (frame) {
    const s = this.streams.get(frame.id)
    if (!s) return
    s.push(frame)
    if (s.ended) {
      this.streams.delete(s.id)
      this.emitStatus()
    }
  }

  /** A `frames` (or an older shim's `frame`) message from the leader. @param {any} m */
  deliverBatch (m) {
    if (typeof m.n === 'number' && typeof m.from === 'string') {
      this.readFrom.delete(m.from)
      this.readFrom.set(m.from, m.n)
      // the last few leaders are enough: a join is about the current and the last one
      if (this.readFrom.size > 4) this.readFrom.delete(this.readFrom.keys().next().value)
    }
    if (Array.isArray(m.frames)) {
      for (const frame of m.frames) if (frame && typeof frame.id === 'string') this.deliverLocal(frame)
    } else if (m.frame) {
      this.deliverLocal(m.frame)
    }
  }

  /** Our streams as a `join` lists them. */
  ownStreamList () {
    const list = []
    for (const s of this.streams.values()) {
      if (s.ended) continue
      list.push({ id: s.id, after: s.lastSeq, open: s.openFrame, sent: s.dispatched })
      s.dispatched = true
    }
    return list
  }

  // ---------------------------------------------------------------- socket owner (leader, solo)

  /** Opens the WebSocket a next leader will say hello on (see DEFAULTS.warmSocketMs). */
  warmUp () {
    if (this.warm || this.socket || !this.env.WebSocket) return
    this.warm = openWarm(this.env.WebSocket, this.url)
    if (this.warm) this.warmTimer = setTimeout(() => this.dropWarm(), this.opts.warmSocketMs)
  }

  /** The warm WebSocket, for the Socket to use; it is no longer this tab's to close. */
  takeWarm () {
    clearTimeout(this.warmTimer)
    this.warmTimer = undefined
    const ws = this.warm
    this.warm = null
    return ws
  }

  dropWarm () {
    closeWarm(this.takeWarm())
  }

  startOwner () {
    this.fatal = null
    this.router = new Router({ tombstoneLimit: this.opts.tombstoneLimit })
    for (const s of this.streams.values()) {
      if (!s.ended) this.router.add(this.tabId, s.openFrame, { lastSeq: s.lastSeq, sent: s.dispatched })
      s.dispatched = true
    }
    this.socket = new Socket(this.url, {
      token: this.token,
      WebSocket: this.env.WebSocket,
      backoffBaseMs: this.opts.backoffBaseMs,
      backoffMaxMs: this.opts.backoffMaxMs,
      heartbeatMs: this.opts.heartbeatMs,
      tokenRefreshSkewMs: this.opts.tokenRefreshSkewMs,
      warm: this.takeWarm(),
      resume: () => {
        this.helloPending = true
        this.renewOnWelcome = false
        return this.router.resumeList(++this.hello)
      },
      onWelcome: frame => this.onWelcome(frame),
      onFrame: frame => this.onServerFrame(frame),
      onState: state => this.setConnection(state),
      onFatal: error => this.onFatal(error),
    })
  }

  stopOwner () {
    this.flushOutbox()
    this.socket?.disconnect()
    this.socket = null
    this.router = null
  }

  /** @param {string} tab @param {any} open */
  ownerOpen (tab, open) {
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
    if (!this.socket.ready && router.pendingCount() >= this.opts.sendBufferLimit) {
      this.deliverTo(tab, {
        type: FRAME.error, id: open.id, code: CLIENT_ERROR_CODE.bufferFull,
        message: `${this.opts.sendBufferLimit} streams are already waiting for the connection`,
      })
      return
    }
    router.add(tab, open)
    this.flushPending()
  }

  /** @param {string} id */
  ownerCancel (id) {
    const route = this.router?.get(id)
    if (!route) return
    if (!route.sent) {
      this.router.remove(id, 'ended')
      return
    }
    route.cancelled = true
    this.socket.send({ type: FRAME.cancel, id })
  }

  /** Sends the `open` of every stream not sent yet, if the socket is ready. */
  flushPending () {
    if (!this.socket?.ready) return
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
      route.sent = true
    }
  }

  /** @param {any} frame */
  onWelcome (frame) {
    this.user = frame.user ?? this.user
    this.tier = frame.tier ?? this.tier
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
    this.emitStatus()
    if (this.role === ROLE.leader) this.broadcastStatus()
  }

  /** @param {any} frame */
  onServerFrame (frame) {
    if (frame.id === null || frame.id === undefined) {
      if (frame.type === FRAME.error) {
        const error = MuxError.fromFrame(frame)
        this.emit('error', error)
        if (this.role === ROLE.leader) this.bus.post({ t: BUS.connError, error: error.toJSON() })
      }
      return
    }
    const routed = this.router?.route(frame)
    if (routed) this.deliverTo(routed.tab, routed.frame)
  }

  /**
   * Sends a frame to the tab that owns its stream: ours at once, a follower's into its batch,
   * which goes to its inbox at the end of this task (with the frames of the socket messages
   * that arrive before then: a replay after a handover reaches each tab in a few messages).
   * @param {string} tab @param {any} frame
   */
  deliverTo (tab, frame) {
    if (tab === this.tabId) {
      this.deliverLocal(frame)
      return
    }
    if (!this.bus) return
    const batch = this.outbox.get(tab)
    if (batch) batch.push(frame)
    else this.outbox.set(tab, [frame])
    if (!this.flushQueued) {
      this.flushQueued = true
      this.nextTask(() => this.flushOutbox())
    }
  }

  flushOutbox () {
    this.flushQueued = false
    if (this.outbox.size === 0) return
    const outbox = this.outbox
    this.outbox = new Map()
    for (const [tab, frames] of outbox) {
      const n = (this.posted.get(tab) ?? 0) + 1
      this.posted.set(tab, n)
      if (this.inboxTabs?.has(tab)) this.bus?.post({ t: BUS.frames, to: tab, n, frames }, { keep: true })
      else for (const frame of frames) this.bus?.post({ t: BUS.frame, to: tab, frame }, { shared: true })
    }
  }

  /**
   * Runs `fn` in a task of its own, soon: a MessageChannel hop, which (unlike setTimeout) a
   * browser does not clamp or throttle in a hidden tab, where the leader may well be.
   */
  nextTask (fn) {
    if (!this.hop) {
      const Channel = globalThis.MessageChannel
      if (Channel) {
        const ch = new Channel()
        const queue = []
        ch.port1.onmessage = () => queue.shift()?.()
        ch.port1.unref?.() // node: the tests' fake tabs must not keep the process alive
        this.hop = (f) => { queue.push(f); ch.port2.postMessage(0) }
        this.hopPort = ch.port1
      } else {
        this.hop = (f) => setTimeout(f, 0)
      }
    }
    this.hop(fn)
  }

  /** @param {MuxError} error the socket gave up (token refused) */
  onFatal (error) {
    this.fatal = error
    this.emit('error', error)
    if (this.role === ROLE.leader) this.bus.post({ t: BUS.connError, error: error.toJSON() })
    for (const route of [...this.router.streams.values()]) {
      this.router.remove(route.id, 'ended')
      if (route.cancelled) continue
      this.deliverTo(route.tab, { type: FRAME.error, id: route.id, code: error.code, message: error.message })
    }
  }

  /** @param {string} state */
  setConnection (state) {
    if (this.connection === state) return
    this.connection = state
    this.emitStatus()
    if (this.role === ROLE.leader) this.broadcastStatus()
  }

  // ---------------------------------------------------------------- leader

  /** @param {'available'|'queued'|'stolen'} how */
  becomeLeader (how) {
    if (!this.running || this.frozen || this.role === ROLE.closed) {
      this.election.resign()
      return
    }
    // The handshake first, before anything else on this (often busy) main thread: it runs in
    // the network stack while this tab collects the stream table; hello waits for that.
    this.warmUp()
    const previous = { leader: this.leaderId, roster: this.knownRoster, resign: this.lastResign }
    this.clearFollowerTimers()
    this.setRole(ROLE.leader)
    this.epoch = nextEpoch(this.maxEpochN, this.tabId)
    this.maxEpochN = this.epoch.n
    this.leaderId = this.tabId
    this.leaderEpoch = this.epoch
    this.lastResign = null
    this.roster = new Roster(this.tabId, { maxMissed: this.opts.tabMaxMissed })
    this.startOwner()
    const resigned = !!previous.resign && previous.resign.from === previous.leader
    this.posted = new Map()
    this.inherited = null
    /** Followers whose shim reads its inbox (their join said so, or the last leader's resign). */
    this.inboxTabs = new Set(resigned && Array.isArray(previous.resign.inbox) ? previous.resign.inbox : [])
    if (resigned) this.socket.seedToken(previous.resign.token)
    else this.socket.prefetchToken()
    if (resigned) {
      this.inherited = { from: previous.resign.from, posted: previous.resign.posted ?? {} }
      this.adopt(previous.resign.from, previous.resign.streams, { fromOwner: false })
    }
    // The last leader resigned: its table has every stream, so hello goes out at once (the
    // tabs' joins can only lower a resume point, which a second hello then fixes). Else it
    // crashed or hung: wait for the tabs it knew (not for it), so that one hello resumes
    // all their streams, and so that a tab deposed while waiting never opens a socket.
    const expected = resigned
      ? new Set()
      : new Set(previous.roster.filter(t => t !== this.tabId && t !== previous.leader))
    this.collecting = { expected, timer: undefined, after: previous.leader }
    this.bus.post({ t: BUS.claim, v: BUS_VERSION, epoch: this.epoch, how })
    if (expected.size === 0) {
      this.finishCollecting()
    } else {
      this.collecting.timer = setTimeout(() => this.finishCollecting(), this.opts.collectMs)
    }
    this.hbTimer = setInterval(() => this.leaderBeat(), this.opts.tabHeartbeatMs)
    this.tabs = this.roster.size
    this.emitStatus()
  }

  finishCollecting () {
    if (!this.collecting) return
    clearTimeout(this.collecting.timer)
    this.collecting = null
    this.socket.connect()
  }

  /**
   * Takes over streams that another tab reports (its own in a `join`, or a whole table in a
   * `resign`).
   * @param {string} from
   * @param {Array<{id: string, tab?: string, after: number, open: any, sent: boolean, cancelled?: boolean}>} list
   * @param {{fromOwner: boolean, read?: Record<string, number>}} how `fromOwner`: the owning
   *   tab itself says what it has seen; `read`: how many frame batches it had read from which
   *   leader when it said so
   */
  adopt (from, list, { fromOwner, read }) {
    if (!Array.isArray(list)) return
    let renew = false
    // A tab behind what was forwarded to it is usually just behind: the frames are on their
    // way. Only once it has read every batch that was posted to it is it really missing some.
    const readOf = leader => (read && typeof read[leader] === 'number' ? read[leader] : 0)
    const caughtUp = fromOwner &&
      (this.posted.get(from) ?? 0) <= readOf(this.tabId) &&
      (!this.inherited || (this.inherited.posted[from] ?? 0) <= readOf(this.inherited.from))
    for (const s of list) {
      if (!s || typeof s.id !== 'string' || !s.open) continue
      const tab = s.tab ?? from
      if (tab === this.tabId && !fromOwner) continue // we know our own streams better
      const route = this.router.get(s.id)
      if (route) {
        if (route.cancelled && fromOwner) {
          // we gave up on this tab while it was silent; tell it
          this.deliverTo(tab, {
            type: FRAME.error, id: s.id, code: CLIENT_ERROR_CODE.tabGone,
            message: 'this tab stopped answering, so its stream was cancelled',
          })
        } else if (s.after < route.lastSeq && caughtUp) {
          route.lastSeq = s.after
          // the tab missed frames we forwarded (it was frozen), or the last leader's table
          // was ahead of it: only a replay brings them back
          if (fromOwner && route.sent) {
            if (this.socket.ready) renew = true
            else if (this.helloPending && route.hello === this.hello) this.renewOnWelcome = true
          }
        }
        continue
      }
      const tomb = this.router.tombstone(s.id)
      if (tomb) {
        if (tomb === 'vanished' && fromOwner) {
          this.deliverTo(tab, {
            type: FRAME.error, id: s.id, code: CLIENT_ERROR_CODE.tabGone,
            message: 'this tab stopped answering, so its stream was cancelled',
          })
        }
        continue // 'ended': its terminal frame is on its way to the tab
      }
      if (s.cancelled && !s.sent) continue
      const added = this.router.add(tab, s.open, { lastSeq: s.after ?? 0, sent: !!s.sent, cancelled: !!s.cancelled })
      if (!added) continue
      this.roster.touch(tab)
      if (added.sent && !this.collecting && this.socket.ready) renew = true
    }
    if (!this.collecting) {
      this.flushPending()
      if (renew) this.socket.renew()
    }
    this.tabs = this.roster.size
  }

  leaderBeat () {
    if (this.role !== ROLE.leader) return
    for (const tab of this.roster.beat()) this.dropTab(tab, 'vanished')
    this.broadcastStatus()
  }

  /** A follower left (`bye`) or stopped answering: cancel its streams upstream. */
  dropTab (tab, reason) {
    this.roster.leave(tab)
    this.flushOutbox() // its last frames (and the tab_gone below) before the handle closes
    for (const route of this.router.routesOf(tab)) {
      this.ownerCancel(route.id)
      if (reason === 'vanished') {
        if (this.router.has(route.id)) this.router.get(route.id).vanished = true
        else this.router.tombstones.set(route.id, 'vanished')
        this.deliverTo(tab, {
          type: FRAME.error, id: route.id, code: CLIENT_ERROR_CODE.tabGone,
          message: 'this tab stopped answering, so its stream was cancelled',
        })
      }
    }
    if (reason === 'vanished') this.flushOutbox()
    this.bus.forget(tab)
    this.tabs = this.roster.size
    this.emitStatus()
  }

  broadcastStatus () {
    if (this.role !== ROLE.leader) return
    this.tabs = this.roster.size
    this.bus.post({ t: BUS.hb, ...this.leaderPayload() })
    this.emitStatus()
  }

  /**
   * One heartbeat for many joins: after a takeover every tab joins at once, and a heartbeat
   * per join would be N² deliveries (and more joins from tabs it does not list yet).
   */
  soonBroadcastStatus () {
    if (this.statusTimer !== undefined) return
    this.statusTimer = setTimeout(() => {
      this.statusTimer = undefined
      this.broadcastStatus()
    }, this.opts.tabHeartbeatMs / 10)
  }

  leaderPayload () {
    return {
      v: BUS_VERSION,
      epoch: this.epoch,
      roster: this.roster.list(),
      tabs: this.roster.size,
      connection: this.collecting ? CONNECTION.connecting : this.connection,
      user: this.user,
      tier: this.tier,
      visible: this.isVisible(),
    }
  }

  /** @param {any} m */
  onLeaderBus (m) {
    const from = m.from
    switch (m.t) {
      case BUS.join:
        if (m.v >= 2) this.inboxTabs.add(from)
        else this.inboxTabs.delete(from)
        if (this.roster.touch(from, { visible: m.visible })) this.tabs = this.roster.size
        this.adopt(from, m.streams, { fromOwner: true, read: m.read })
        if (this.collecting) {
          this.collecting.expected.delete(from)
          if (this.collecting.expected.size === 0) this.finishCollecting()
        }
        this.soonBroadcastStatus()
        return
      case BUS.open:
        if (this.roster.touch(from)) this.soonBroadcastStatus()
        if (m.frame && typeof m.frame.id === 'string') this.ownerOpen(from, m.frame)
        return
      case BUS.cancel:
        if (this.router.get(m.id)?.tab === from) this.ownerCancel(m.id)
        return
      case BUS.bye:
        this.dropTab(from, 'bye')
        this.soonBroadcastStatus()
        return
      case BUS.ack:
        this.roster.ack(from, { visible: m.visible })
        return
      case BUS.probe:
        this.roster.ack(from)
        this.toTab(from, { t: BUS.pong, to: from, ...this.leaderPayload() })
        return
      case BUS.claim:
      case BUS.hb:
        // Another tab leads with a later epoch: our lock was stolen (its rejection may lag).
        if (compareEpochs(m.epoch, this.epoch) > 0) {
          this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
          this.stepDown({ handoff: true, rejoin: true })
          this.onFollowerBus(m)
        }
        return
      case BUS.frame:
      case BUS.frames:
        // sent by the leader before us, still in flight when we took over
        this.deliverBatch(m)
        return
      case BUS.resign:
        // the last leader's table arrived after the lock did, or a deposed leader's (it was
        // stuck when we took over): streams we lack
        if (m.from === this.tabId) return
        if (this.collecting && m.from === this.collecting.after) {
          this.inherited = { from: m.from, posted: m.posted ?? {} }
          this.socket.seedToken(m.token)
          if (Array.isArray(m.inbox)) for (const tab of m.inbox) this.inboxTabs.add(tab)
        }
        this.adopt(m.from, m.streams, { fromOwner: false })
        if (this.collecting && m.from === this.collecting.after) this.finishCollecting()
        return
      default:
    }
  }

  /**
   * @param {{handoff: boolean, rejoin: boolean, leaving?: boolean}} how
   *   handoff: publish the stream table for the next leader; rejoin: follow the next
   *   leader; leaving: this page is going away, its own streams are not handed over
   */
  stepDown ({ handoff, rejoin, leaving = false }) {
    if (this.role !== ROLE.leader) return
    clearInterval(this.hbTimer)
    this.hbTimer = undefined
    clearTimeout(this.statusTimer)
    this.statusTimer = undefined
    if (this.collecting) clearTimeout(this.collecting.timer)
    this.collecting = null
    const streams = this.router.snapshot(r => !(leaving && r.tab === this.tabId))
    const roster = this.roster.list()
    // the next leader connects with it instead of waiting for the token function (tabs of
    // one origin share the user's token anyway)
    const token = this.socket?.cachedToken ?? undefined
    // Close first, so the gateway detaches the streams before the next leader resumes them.
    this.stopOwner()
    this.bus.forgetAll()
    const inbox = [...(this.inboxTabs ?? [])]
    if (handoff) this.bus.post({ t: BUS.resign, epoch: this.epoch, streams, roster, posted: Object.fromEntries(this.posted), token, inbox })
    this.posted = new Map()
    this.roster = null
    this.knownRoster = roster
    this.leaderId = null
    this.election.resign()
    if (rejoin) {
      this.becomeFollower()
    } else {
      this.setRole(ROLE.electing)
    }
  }

  // ---------------------------------------------------------------- follower

  becomeFollower () {
    if (!this.running || this.frozen) return
    this.setRole(ROLE.follower)
    this.silent = 0
    // after a freeze or a step-down the leader must hear how far our streams got
    this.mustJoin = true
    this.connection = this.leaderId ? this.connection : CONNECTION.connecting
    this.election.queue()
    this.clearFollowerTimers()
    this.followTimer = setInterval(() => this.followerBeat(), this.opts.tabHeartbeatMs)
    this.bus.post({ t: BUS.probe })
    this.emitStatus()
  }

  clearFollowerTimers () {
    clearInterval(this.followTimer)
    clearTimeout(this.stealTimer)
    this.followTimer = undefined
    this.stealTimer = undefined
  }

  followerBeat () {
    if (this.role !== ROLE.follower) return
    this.silent++
    if (this.silent >= this.opts.leaderMaxSilent) {
      this.takeOver('silent')
    } else if (this.silent >= 2) {
      // heartbeats are late: ask directly (answered from the leader's event loop, which the
      // browser does not throttle like its timers)
      this.bus.post({ t: BUS.probe })
    }
    if (this.leaderId && this.leaderHiddenSince !== null && this.isVisible() &&
        Date.now() - this.leaderHiddenSince >= this.opts.preferVisibleMs) {
      this.takeOver('visible')
    }
  }

  /**
   * Takes the lock from a leader that is silent (frozen, hung) or hidden while we are seen.
   * One follower at a time: the n-th follower of the leader's roster (visible ones first)
   * waits n × `stealStaggerMs`, then probes and waits half a step more, and steals only if
   * no leader spoke meanwhile. The first to steal claims; the others hear the claim and
   * stand down, so a stuck leader costs one steal, not one per tab.
   * @param {'silent'|'visible'} reason
   */
  takeOver (reason) {
    if (this.stealTimer !== undefined) return
    const step = this.opts.stealStaggerMs
    const order = this.knownRoster.filter(t => t !== this.leaderId)
    let rank = order.indexOf(this.tabId)
    if (rank < 0) rank = order.length
    if (!this.isVisible()) rank += order.length + 1
    const delay = Math.round(rank * step + Math.random() * step / 4)
    const epoch = this.leaderEpoch
    const stillNeeded = () => {
      if (this.role !== ROLE.follower || !this.running || this.frozen) return false
      if (compareEpochs(this.leaderEpoch, epoch) !== 0) return false // someone took over
      return reason === 'silent'
        ? this.silent >= this.opts.leaderMaxSilent
        : this.leaderHiddenSince !== null && this.isVisible()
    }
    this.stealTimer = setTimeout(() => {
      this.stealTimer = undefined
      if (!stillNeeded()) return
      const heard = this.heard
      if (reason === 'silent') this.bus.post({ t: BUS.probe })
      this.stealTimer = setTimeout(() => {
        this.stealTimer = undefined
        if (!stillNeeded() || (reason === 'silent' && this.heard !== heard)) return
        if (reason === 'silent') {
          // the silent leader will not resign: do not wait for it
          this.knownRoster = this.knownRoster.filter(t => t !== this.leaderId)
        }
        this.election.steal()
      }, Math.round(step / 2))
    }, delay)
  }

  /** @param {any} m a claim, hb or pong */
  noteLeader (m, claim) {
    if (!m.epoch || typeof m.epoch.n !== 'number') return
    if (this.leaderEpoch && compareEpochs(m.epoch, this.leaderEpoch) < 0) return // a deposed leader
    this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
    const changed = compareEpochs(m.epoch, this.leaderEpoch) !== 0
    this.leaderEpoch = m.epoch
    this.leaderId = m.from
    this.leaderReadsInbox = m.v >= 2
    this.silent = 0
    this.heard++
    if (Array.isArray(m.roster)) this.knownRoster = m.roster
    if (typeof m.tabs === 'number') this.tabs = m.tabs
    if (m.connection) this.connection = m.connection
    if (m.user !== undefined) this.user = m.user
    if (m.tier !== undefined) this.tier = m.tier
    if (m.visible === false) this.leaderHiddenSince ??= Date.now()
    else if (m.visible === true) this.leaderHiddenSince = null
    // not listed: the leader dropped us, or our join is still on its way (then wait a beat)
    const forgotten = Array.isArray(m.roster) && !m.roster.includes(this.tabId) &&
      Date.now() - this.joinedAt > this.opts.tabHeartbeatMs
    if (changed || claim || forgotten || this.mustJoin) {
      this.mustJoin = false
      this.joinedAt = Date.now()
      this.toLeader({ t: BUS.join, v: BUS_VERSION, visible: this.isVisible(), streams: this.ownStreamList(), read: Object.fromEntries(this.readFrom) })
    }
    this.emitStatus()
  }

  /** @param {any} m */
  onFollowerBus (m) {
    switch (m.t) {
      case BUS.claim:
        this.dropWarm() // another tab got the lock
        this.noteLeader({ ...m, connection: CONNECTION.connecting }, true)
        return
      case BUS.hb:
        this.noteLeader(m, false)
        if (m.from === this.leaderId) this.toLeader({ t: BUS.ack, visible: this.isVisible() })
        return
      case BUS.pong:
        this.noteLeader(m, false)
        return
      case BUS.frame:
      case BUS.frames:
        this.deliverBatch(m)
        return
      case BUS.connError:
        this.emit('error', new MuxError(m.error?.code ?? ERROR_CODE.internal, m.error?.message))
        return
      case BUS.resign:
        this.lastResign = m
        if (m.epoch) this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
        if (m.from === this.leaderId) {
          if (Array.isArray(m.roster)) this.knownRoster = m.roster
          // the head of its roster is usually the head of the lock's queue too (both are in
          // the order the tabs came): start the handshake now, while the lock is on its way
          if (Array.isArray(m.roster) && m.roster[1] === this.tabId) this.warmUp()
          this.connection = CONNECTION.reconnecting
          this.emitStatus()
        }
        return
      default:
    }
  }

  // ---------------------------------------------------------------- bus, roles, events

  /** @param {any} m */
  onBus (m) {
    if (!this.running || this.frozen) return
    if (m.epoch && typeof m.epoch.n === 'number') this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
    if (m.t === BUS.frames || m.t === BUS.frame) {
      // our streams' frames, whatever our role now (a leader's last ones may land after it left)
      this.deliverBatch(m)
      return
    }
    if (this.role === ROLE.leader) {
      this.onLeaderBus(m)
    } else if (this.role === ROLE.follower) {
      this.onFollowerBus(m)
    } else if (this.role === ROLE.electing) {
      // remember what we hear while deciding, so we can follow or lead knowing it
      if (m.t === BUS.resign) this.onFollowerBus(m)
      if ((m.t === BUS.hb || m.t === BUS.claim || m.t === BUS.pong) && m.epoch) {
        if (Array.isArray(m.roster)) this.knownRoster = m.roster
      }
    }
  }

  /** @param {string} role */
  setRole (role) {
    if (this.role === role) return
    this.role = role
    if (role === ROLE.solo) this.tabs = 1
    this.emitStatus()
  }

  emitStatus () {
    const status = this.status()
    const key = JSON.stringify(status)
    if (key === this.lastStatus) return
    this.lastStatus = key
    this.emit('status', status)
  }

  /** @param {string} event @param {any} payload */
  emit (event, payload) {
    for (const fn of this.listeners.get(event) ?? []) {
      try {
        fn(payload)
      } catch (err) {
        // a listener's bug must not break the socket's event handling
        setTimeout(() => { throw err })
      }
    }
  }
}
