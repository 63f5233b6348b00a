import { BUS, CLIENT_ERROR_CODE, CONNECTION, DEFAULTS, FRAME, ROLE, WS_PATH } from './constants.js'
import Bus from './bus.js'
import Election, { tabLockName } from './election.js'
import MuxError from './errors.js'
import { createFetch } from './fetch.js'
import Follower from './follower.js'
import { makeTabId, streamId } from './ids.js'
import Leader from './leader.js'
import Solo from './solo.js'
import Standby from './standby.js'
import { closeWarm, openWarm } from './socket.js'
import ChatStream from './stream.js'

export { compareEpochs, nextEpoch } from './election.js'

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
 * Mux keeps what a tab has whatever its role: its streams (each dedupes by seq, ChatStream),
 * its status and listeners, the bus and the election, what it heard of the leaders. The
 * role's own state and rules live in its part, `this.part`, to which Mux delegates:
 * - Leader (leader.js): holds the lock; owns the socket and its Router (a SocketOwner,
 *   owner.js) for every tab, and the Roster of followers; batches frames to their inboxes.
 * - Follower (follower.js): sends `open`/`cancel` to the leader, answers its heartbeats,
 *   joins every new leader with its streams, replaces a silent or hidden leader.
 * - Solo (solo.js): a SocketOwner of its own, for fallback mode.
 * While electing (between leaders) or closed there is no part.
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
    /** @type {Leader|Follower|Solo|null} the current role's part; null while electing or closed */
    this.part = null
    this.connection = CONNECTION.idle
    /** The socket (this tab's or its leader's) has been open since `connect()`. */
    this.everOpen = false
    this.tabs = 1
    this.user = null
    this.tier = null
    this.lastStatus = ''
    /** This tab's own lock while held or asked for: {held, release}. */
    this.tabLock = null
    /** Running: not closed, not hidden away in the bfcache. */
    this.running = false
    this.frozen = false
    this.shared = !!(this.env.BroadcastChannel && this.env.locks)
    /** @type {Bus|null} */
    this.bus = null
    /** @type {Election|null} */
    this.election = null

    // What this tab heard of the leaders, whatever its role: a new leader starts from it.
    this.leaderId = null
    this.leaderEpoch = null
    /** The roster the last leader announced: who a new leader waits for. */
    this.knownRoster = []
    /** The last leader's `resign`, if it stepped down cleanly. */
    this.lastResign = null
    /** Highest epoch seen, so a new leader's epoch is above every earlier one. */
    this.maxEpochN = 0
    /** Batches read per leader tab (the last few leaders), reported in `join`. */
    this.readFrom = new Map()
    /** The WebSocket this tab opened when the leader resigned, expecting to lead next. */
    this.warm = null
    this.warmTimer = undefined
    /** @type {Standby|null} the welcomed connection this tab holds as the next leader */
    this.standby = null
    /** No standby before this (ms since epoch): the gateway refused the last one. */
    this.standbyPausedUntil = 0
    /**
     * While a clean handover runs, this tab's status changes are kept back (`holdStatus`):
     * {timer, pending}. Every tab re-rendered its status two or three times in the same
     * 100 ms (resign, claim, the new socket open), which on a busy machine delayed the new
     * leader's handshake and replay, and showed a "reconnecting" that lasts a blink.
     */
    this.statusHold = null

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
   * A `fetch` for OpenAI-compatible SDKs: `POST …/chat/completions` streams over this tab's
   * shared socket (see fetch.js). Bound: pass it as is, `new OpenAI({ fetch: mux.fetch })`.
   * @returns {typeof fetch}
   */
  get fetch () {
    this.defaultFetch ??= createFetch(this)
    return this.defaultFetch
  }

  /**
   * A `fetch` like `mux.fetch`, with options (`fallback`: the fetch for every other request;
   * `transport`: `'http'` to use the gateway's own `POST /v1/chat/completions`, see fetch.js).
   * @param {{fallback?: typeof fetch, transport?: 'auto'|'websocket'|'http'}} [options]
   * @returns {typeof fetch}
   */
  createFetch (options) {
    return createFetch(this, options)
  }

  /**
   * The socket cannot connect at all: never open since `connect()` (in this tab or, for a
   * follower, its leader), and the last attempt failed. `mux.fetch` then goes over HTTP.
   * @returns {boolean}
   */
  cannotConnect () {
    return !this.everOpen && this.connection === CONNECTION.reconnecting
  }

  /**
   * The gateway's HTTP URL for `path` under the WebSocket's directory (`wss://h/v1/ws` →
   * `https://h/v1/<path>`).
   * @param {string} path
   */
  httpUrl (path) {
    return new URL(path, this.url.replace(/^ws/, 'http')).href
  }

  /** A token for an HTTP request, from the same source as the socket's `hello`. */
  async httpToken () {
    return typeof this.token === 'function' ? await this.token() : this.token
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
    this.releaseStatus(false)
    if (this.role === ROLE.leader) this.part?.warnSuccessor()
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
    this.holdTabLock()
    if (!this.shared) {
      this.setRole(ROLE.solo)
      this.tabs = 1
      this.part = new Solo(this)
      this.part.start()
      return
    }
    if (!this.bus) this.bus = new Bus(this.env.BroadcastChannel, this.name, this.tabId, m => this.onBus(m))
    this.bus.open()
    this.holdTabLock()
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
    this.releaseStatus()
    this.dropWarm()
    this.dropStandby()
    if (this.role === ROLE.leader) {
      this.stepDown({ handoff: true, rejoin: false, leaving: final })
    } else if (this.part) {
      // a solo tab back from the bfcache starts a new socket; streams opened meanwhile wait
      this.part.stop()
      this.part = null
    }
    this.election?.stop()
    if (final) {
      this.releaseTabLock()
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
      if (this.role === ROLE.leader) this.part?.warnSuccessor()
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
        this.part.stop()
        this.election.stop()
      }
    })
    on(doc, 'resume', () => {
      if (!this.frozen || this.role === ROLE.closed || !this.running) return
      this.frozen = false
      if (this.role === ROLE.solo) this.reconnectNow()
      else if (this.role === ROLE.electing) this.elect()
      else if (this.role === ROLE.follower) this.becomeFollower()
    })
    on(doc, 'visibilitychange', () => {
      if (this.isVisible()) this.reconnectNow()
      this.part?.onVisibility?.()
    })
    on(win, 'online', () => this.reconnectNow())
  }

  removeLifecycle () {
    for (const off of this.lifecycle ?? []) off()
    this.lifecycle = []
  }

  isVisible () {
    return (this.env.document?.visibilityState ?? 'visible') === 'visible'
  }

  /** The socket, if this tab owns one, reconnects now if it was waiting to. */
  reconnectNow () {
    this.part?.owner?.socket.reconnectNow()
  }

  // ---------------------------------------------------------------- this tab's streams

  /** Hands a new stream to whoever carries it. @param {ChatStream} stream */
  dispatch (stream) {
    // no part (electing): the stream goes out with our `join` once a leader claims, or to
    // the socket this tab opens if it leads
    this.part?.dispatch(stream)
  }

  /** @param {string} id */
  cancelStream (id) {
    this.streams.delete(id)
    this.emitStatus()
    this.part?.cancel(id)
  }

  /** @param {MuxError} error */
  endOwnStreams (error) {
    const ids = [...this.streams.keys()]
    for (const s of this.streams.values()) {
      s.fail(new MuxError(error.code, error.message, { id: s.id }))
    }
    this.streams.clear()
    if (ids.length > 0) this.part?.endStreams(ids)
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
    // the new leader's first frames: the handover is over for this tab (text first, then
    // status and the join it put off)
    if (m.from === this.leaderId && this.role === ROLE.follower && this.lastResign?.from !== m.from) {
      if (this.statusHold) this.releaseStatus()
      if (this.part.joinTimer !== undefined) this.part.join()
    }
  }

  /**
   * Whether the `resign` of `leader` listed every live stream of this tab (then a new leader
   * that resumed from it needs no join to resume them).
   * @param {string|null} leader
   */
  resignListsOwnStreams (leader) {
    const r = this.lastResign
    if (!leader || !r || r.from !== leader || !Array.isArray(r.streams)) return false
    const listed = new Set(r.streams.map(s => s?.id))
    for (const s of this.streams.values()) if (!s.ended && !listed.has(s.id)) return false
    return true
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

  // ---------------------------------------------------------------- roles

  /** @param {'available'|'queued'|'stolen'} how */
  becomeLeader (how) {
    if (!this.running || this.frozen || this.role === ROLE.closed) {
      this.election.resign()
      return
    }
    // A standby needs no handshake. Else the handshake first, before anything else on this
    // (often busy) main thread: it runs in the network stack while this tab collects the
    // stream table; hello waits for that.
    const standby = this.takeStandby()
    if (standby) this.dropWarm()
    else this.warmUp()
    const previous = { leader: this.leaderId, roster: this.knownRoster, resign: this.lastResign }
    this.part?.stop()
    // the page's status listeners (a re-render) run once the hello is on its way, not before
    this.holdStatus(this.opts.handoverQuietMs)
    const leader = new Leader(this)
    this.part = leader
    this.setRole(ROLE.leader)
    leader.start(how, previous, this.takeWarm(), standby)
    leader.nextTask(() => this.releaseStatus())
  }

  /**
   * @param {{handoff: boolean, rejoin: boolean, leaving?: boolean}} how
   *   handoff: publish the stream table for the next leader; rejoin: follow the next
   *   leader; leaving: this page is going away, its own streams are not handed over
   */
  stepDown ({ handoff, rejoin, leaving = false }) {
    if (this.role !== ROLE.leader) return
    const leader = this.part
    this.part = null
    this.knownRoster = leader.stop({ handoff, leaving })
    this.leaderId = null
    this.election.resign()
    if (rejoin) {
      this.becomeFollower()
    } else {
      this.setRole(ROLE.electing)
    }
  }

  /** A later leader spoke while we lead: our lock was stolen (its rejection may lag). @param {any} m */
  deposed (m) {
    this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
    this.stepDown({ handoff: true, rejoin: true })
    this.part?.onBus(m)
  }

  becomeFollower () {
    if (!this.running || this.frozen) return
    const before = this.part instanceof Follower ? this.part : null
    this.part?.stop()
    this.part = new Follower(this, before)
    this.setRole(ROLE.follower)
    this.part.start()
  }

  /** The last leader resigned (heard while following or electing). @param {any} m */
  noteResign (m) {
    this.lastResign = m
    if (m.epoch) this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
    if (m.from !== this.leaderId) return
    if (Array.isArray(m.roster)) this.knownRoster = m.roster
    // the head of its roster is usually the head of the lock's queue too (both are in
    // the order the tabs came): start the handshake now, while the lock is on its way
    if (Array.isArray(m.roster) && m.roster[1] === this.tabId) this.warmUp()
    this.connection = CONNECTION.reconnecting
    // the next leader's claim, then its frames or its word that the socket is open, follow
    // within a few tens of ms: the page sees one status change for all that (or, if it takes
    // longer than handoverQuietMs, "reconnecting" then)
    this.holdStatus(this.opts.handoverQuietMs)
    this.emitStatus()
  }

  /**
   * Keeps status changes back for up to `ms` (see `statusHold`); `status()` stays current.
   * @param {number} ms
   */
  holdStatus (ms) {
    if (this.statusHold || !(ms > 0)) return
    this.statusHold = { timer: setTimeout(() => this.releaseStatus(), ms) }
  }

  /** Ends a hold: the page hears the status as it is now (`emit`: false, not at all). */
  releaseStatus (emit = true) {
    const hold = this.statusHold
    if (!hold) return
    this.statusHold = null
    clearTimeout(hold.timer)
    if (emit) this.emitStatus()
  }

  /** Opens the WebSocket a next leader will say hello on (see DEFAULTS.warmSocketMs). */
  warmUp () {
    if (this.warm || this.part?.owner || !this.env.WebSocket || this.standby?.ready) return
    this.warm = openWarm(this.env.WebSocket, this.url)
    if (this.warm) this.warmTimer = setTimeout(() => this.dropWarm(), this.opts.warmSocketMs)
  }

  /** The warm WebSocket, for a Socket to use; it is no longer this tab's to close. */
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

  /**
   * Holds a standby while this tab is the follower next in line (the head of the leader's
   * roster, which is also the head of the lock's queue), and only then.
   * @param {string[]} roster the leader's, leader first
   */
  updateStandby (roster) {
    const head = this.role === ROLE.follower && roster[1] === this.tabId
    if (!head) {
      this.dropStandby()
      return
    }
    if (this.standby || !this.opts.standby || !this.env.WebSocket || Date.now() < this.standbyPausedUntil) return
    const standby = new Standby(this.url, {
      WebSocket: this.env.WebSocket,
      token: this.token,
      onGone: (refused) => {
        if (this.standby !== standby) return
        this.standby = null
        // refused: wait; else the next heartbeat's roster opens another
        if (refused) this.standbyPausedUntil = Date.now() + this.opts.standbyRetryMs
      },
    })
    this.standby = standby
    standby.open()
  }

  /** The standby's welcomed connection, for a Socket to resume on; null if none is ready. */
  takeStandby () {
    const standby = this.standby
    this.standby = null
    return standby ? standby.take() : null
  }

  dropStandby () {
    const standby = this.standby
    this.standby = null
    standby?.close()
  }

  // ---------------------------------------------------------------- bus, status, events

  /** @param {any} m */
  onBus (m) {
    if (!this.running || this.frozen) return
    if (m.epoch && typeof m.epoch.n === 'number') this.maxEpochN = Math.max(this.maxEpochN, m.epoch.n)
    if (m.t === BUS.frames || m.t === BUS.frame) {
      // our streams' frames, whatever our role now (a leader's last ones may land after it left)
      this.deliverBatch(m)
      return
    }
    if (this.role === ROLE.follower && (m.t === BUS.hb || m.t === BUS.claim || m.t === BUS.pong) && Array.isArray(m.roster) && m.from === this.leaderId) {
      this.updateStandby(m.roster)
    }
    if (this.role === ROLE.electing) {
      // remember what we hear while deciding, so we can follow or lead knowing it
      if (m.t === BUS.resign) this.noteResign(m)
      if ((m.t === BUS.hb || m.t === BUS.claim || m.t === BUS.pong) && m.epoch) {
        if (Array.isArray(m.roster)) this.knownRoster = m.roster
      }
      return
    }
    this.part?.onBus?.(m)
  }

  /** @param {string} role */
  setRole (role) {
    if (this.role === role) return
    this.role = role
    if (role === ROLE.solo) this.tabs = 1
    this.emitStatus()
  }

  /** @param {string} state @returns {boolean} whether it changed */
  setConnection (state) {
    if (this.connection === state) return false
    this.connection = state
    if (state === CONNECTION.open) this.everOpen = true
    if (state === CONNECTION.open) this.releaseStatus(false)
    this.emitStatus()
    return true
  }

  /**
   * Takes this tab's own lock (`tabLockName`) and holds it until the page goes away (not
   * while merely frozen: a frozen tab is not gone), so that the leader learns of its crash
   * from the lock's grant. A follower tells the leader once it holds it.
   */
  holdTabLock () {
    if (this.tabLock || !this.shared) return
    const hold = { held: false, release: () => {} }
    this.tabLock = hold
    const kept = new Promise((resolve) => { hold.release = resolve })
    this.env.locks.request(tabLockName(this.name, this.tabId), { mode: 'exclusive' }, () => {
      if (this.tabLock !== hold) return undefined // released before it was granted
      hold.held = true
      this.part?.onTabLock?.()
      return kept
    }).catch(() => {
      // no tab lock (a browser that refuses it): followers keep answering every heartbeat
      if (this.tabLock === hold) hold.held = false
    })
  }

  /** Whether this tab holds its tab lock. */
  get holdsTabLock () {
    return this.tabLock?.held === true
  }

  releaseTabLock () {
    const hold = this.tabLock
    this.tabLock = null
    hold?.release()
  }

  emitStatus () {
    if (this.statusHold) return
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
