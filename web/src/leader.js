import { BUS, BUS_VERSION, CLIENT_ERROR_CODE, CONNECTION, FRAME } from './constants.js'
import { compareEpochs, nextEpoch, tabLockName } from './election.js'
import SocketOwner from './owner.js'
import Roster from './roster.js'

const TAB_GONE = 'this tab stopped answering, so its stream was cancelled'

/**
 * The leader's part: it holds the Web Lock and owns the socket (a SocketOwner) for every
 * tab. It keeps the roster of followers (who still answers its heartbeats), takes their
 * streams over (`join`, or the last leader's table in `resign`), batches each follower's
 * frames to that tab's inbox, and hands everything to the next leader when it steps down.
 *
 * @example
 * const leader = new Leader(mux)
 * leader.start('queued', { leader: lastLeaderId, roster: lastRoster, resign: lastResign })
 * leader.onBus({ t: 'join', from: 'k3f9', streams: [...] })
 * const roster = leader.stop({ handoff: true, leaving: true }) // posts `resign`
 */
export default class Leader {
  /** @param {import('./mux.js').default} tab */
  constructor (tab) {
    this.tab = tab
    /** @type {import('./election.js').Epoch|null} */
    this.epoch = null
    this.roster = new Roster(tab.tabId, { maxMissed: tab.opts.tabMaxMissed })
    /** @type {SocketOwner|null} */
    this.owner = null
    this.hbTimer = undefined
    this.statusTimer = undefined
    /** While it waits for the other tabs' streams: {expected: Set, timer, after}. */
    this.collecting = null
    /** Frames per follower tab, posted together (one bus message per tab per task). */
    this.outbox = new Map()
    this.flushQueued = false
    /** Batches posted per follower tab: a `join` says how many it has read. */
    this.posted = new Map()
    /** The last leader's `posted`, from its resign: {from, posted: {tab: n}}. */
    this.inherited = null
    /** Followers whose shim reads its inbox (their join said so, or the last leader's resign). */
    this.inboxTabs = new Set()
    this.hop = null
    /** Followers whose tab lock this leader waits for (its grant: the tab is gone), tab → abort. */
    this.watches = new Map()
    /** A tab lock request failed: every follower answers every heartbeat again. */
    this.watchFailed = false
    /** Heartbeats sent, to ask for acks in one of `tabAckEvery`. */
    this.beats = 0
    /** The pending parts of this period's heartbeat (see `heartbeat`). */
    this.slotTimers = []
    /** The followers have heard that this leader's socket was open once. */
    this.announcedOpen = false
    /** `stop()` runs: the socket's last state changes are not news for the followers. */
    this.stopping = false
  }

  /**
   * @param {'available'|'queued'|'stolen'} how
   * @param {{leader: string|null, roster: string[], resign: any}} previous what this tab
   *   knew of the last leader
   * @param {WebSocket|null} warm a WebSocket opened for the first hello
   * @param {{ws: WebSocket, token: string, welcome: any}|null} [standby] a welcomed connection
   *   the streams are resumed on instead (see Standby)
   */
  start (how, previous, warm, standby = null) {
    const tab = this.tab
    this.epoch = nextEpoch(tab.maxEpochN, tab.tabId)
    tab.maxEpochN = this.epoch.n
    tab.leaderId = tab.tabId
    tab.leaderEpoch = this.epoch
    tab.lastResign = null
    this.owner = new SocketOwner(tab, {
      warm,
      standby,
      forward: (to, frame) => this.forward(to, frame),
      onChange: () => this.connectionChanged(),
      onConnectionError: error => tab.bus.post({ t: BUS.connError, error: error.toJSON() }),
      onBatchEnd: () => this.flushOutbox(),
    })
    const resign = previous.resign
    const resigned = !!resign && resign.from === previous.leader
    if (resigned) {
      if (Array.isArray(resign.inbox)) for (const t of resign.inbox) this.inboxTabs.add(t)
      this.owner.socket.seedToken(resign.token)
      this.inherited = { from: resign.from, posted: resign.posted ?? {} }
      this.adopt(resign.from, resign.streams, { fromOwner: false })
    } else {
      this.owner.socket.prefetchToken()
    }
    // The last leader resigned: its table has every stream, so hello goes out at once (the
    // tabs' joins can only lower a resume point, which a second hello then fixes). Else it
    // crashed or hung: wait for the tabs it knew (not for it), so that one hello resumes
    // all their streams, and so that a tab deposed while waiting never says hello.
    const expected = resigned
      ? new Set()
      : new Set(previous.roster.filter(t => t !== tab.tabId && t !== previous.leader))
    this.collecting = { expected, timer: undefined, after: previous.leader }
    // table: the followers listed in it may join once the replay is out (Follower `joinLater`)
    tab.bus.post({ t: BUS.claim, v: BUS_VERSION, epoch: this.epoch, how, table: resigned })
    if (expected.size === 0) {
      this.finishCollecting()
    } else {
      this.collecting.timer = setTimeout(() => this.finishCollecting(), tab.opts.collectMs)
    }
    this.hbTimer = setInterval(() => this.beat(), tab.opts.tabHeartbeatMs)
    tab.tabs = this.roster.size
    tab.emitStatus()
  }

  finishCollecting () {
    if (!this.collecting) return
    clearTimeout(this.collecting.timer)
    this.collecting = null
    this.owner.connect()
  }

  /**
   * Stops leading: closes the socket first (so the gateway detaches the streams before the
   * next leader resumes them) and, with `handoff`, posts the stream table for the next one.
   * @param {{handoff: boolean, leaving: boolean}} how leaving: this page is going away, its
   *   own streams are not handed over
   * @returns {string[]} the roster, for the tab to remember
   */
  stop ({ handoff, leaving }) {
    const tab = this.tab
    this.stopping = true
    clearInterval(this.hbTimer)
    this.hbTimer = undefined
    this.clearSlots()
    for (const t of [...this.watches.keys()]) this.unwatch(t)
    clearTimeout(this.statusTimer)
    this.statusTimer = undefined
    if (this.collecting) clearTimeout(this.collecting.timer)
    this.collecting = null
    const streams = this.owner.router.snapshot(r => !(leaving && r.tab === tab.tabId))
    const roster = this.roster.list()
    // the next leader connects with it instead of waiting for the token function (tabs of
    // one origin share the user's token anyway)
    const token = this.owner.socket.cachedToken ?? undefined
    this.flushOutbox()
    this.owner.stop()
    tab.bus.forgetAll()
    if (handoff) {
      tab.bus.post({
        t: BUS.resign, epoch: this.epoch, streams, roster, posted: Object.fromEntries(this.posted), token, inbox: [...this.inboxTabs],
      })
    }
    return roster
  }

  /**
   * This page is going away: tells the head of the roster (first in the lock's queue too, as
   * a rule) to open its WebSocket now, while this tab still ends its streams and steps down.
   */
  warnSuccessor () {
    const next = this.roster.list()[1]
    if (next && this.inboxTabs.has(next)) this.tab.bus.post({ t: BUS.leaving, to: next }, { keep: true })
  }

  /** @param {any} stream a ChatStream of this tab */
  dispatch (stream) { this.owner.dispatch(stream) }
  /** @param {string} id */
  cancel (id) { this.owner.cancel(id) }
  /** This tab's streams ended (it is closing). @param {string[]} ids */
  endStreams (ids) { this.owner.cancelAll(ids) }

  onVisibility () {
    this.broadcastStatus()
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
    const tab = this.tab
    const router = this.owner.router
    let renew = false
    // A tab behind what was forwarded to it is usually just behind: the frames are on their
    // way. Only once it has read every batch that was posted to it is it really missing some.
    // Frames already routed to it but still in its outbox (posted at the end of this task)
    // are a batch on its way too: without them, a join read between a socket message and
    // that flush looked like a tab that lost frames, and cost a needless new connection.
    const readOf = leader => (read && typeof read[leader] === 'number' ? read[leader] : 0)
    const caughtUp = fromOwner &&
      (this.posted.get(from) ?? 0) + (this.outbox.has(from) ? 1 : 0) <= readOf(tab.tabId) &&
      (!this.inherited || (this.inherited.posted[from] ?? 0) <= readOf(this.inherited.from))
    for (const s of list) {
      if (!s || typeof s.id !== 'string' || !s.open) continue
      const owner = s.tab ?? from
      if (owner === tab.tabId && !fromOwner) continue // we know our own streams better
      const route = router.get(s.id)
      if (route) {
        if (route.cancelled && fromOwner) {
          // we gave up on this tab while it was silent; tell it
          this.owner.deliverTo(owner, { type: FRAME.error, id: s.id, code: CLIENT_ERROR_CODE.tabGone, message: TAB_GONE })
        } else if (caughtUp && this.owner.rewind(s.id, s.after)) {
          renew = true
        }
        continue
      }
      const tomb = router.tombstone(s.id)
      if (tomb) {
        if (tomb === 'vanished' && fromOwner) {
          this.owner.deliverTo(owner, { type: FRAME.error, id: s.id, code: CLIENT_ERROR_CODE.tabGone, message: TAB_GONE })
        }
        continue // 'ended': its terminal frame is on its way to the tab
      }
      if (s.cancelled && !s.sent) continue
      const added = router.add(owner, s.open, { lastSeq: s.after ?? 0, sent: !!s.sent, cancelled: !!s.cancelled })
      if (!added) continue
      this.roster.touch(owner)
      if (added.sent && !this.collecting && this.owner.ready) renew = true
    }
    if (!this.collecting) {
      this.owner.flushPending()
      if (renew) this.owner.renew()
    }
    tab.tabs = this.roster.size
  }

  /**
   * A follower whose tab lock we watch is asked for an ack only every `tabAckEvery` beats
   * (acks then only catch a stuck tab, and it is still dropped after about as long a silence:
   * an ask left unanswered counts `tabAckEvery` beats, see Roster.beat); the others, every beat. 29 followers answering
   * every second kept the leader's renderer busy for nothing.
   */
  beat () {
    this.beats++
    const every = Math.max(1, this.tab.opts.tabAckEvery)
    const ackBeat = this.watchFailed || this.beats % every === 0
    const weight = (t, missed) => !this.watches.has(t) ? 1 : !ackBeat ? 0 : missed > 0 ? every : 1
    for (const t of this.roster.beat(weight)) this.dropTab(t, 'vanished')
    this.heartbeat(ackBeat)
  }

  /**
   * This period's heartbeat, to each follower's inbox, spread over the period in
   * `tabHeartbeatSlots` parts: one `hb` on the shared channel woke every follower in the same
   * instant, and their acks came back together, so 30 renderers queued for 2 cores at once
   * every second. Followers keep the same heartbeat period (and so the same detection of a
   * hung leader or follower); only its phase differs per slot. A tab of an older shim reads no
   * inbox: while one is in the roster, the heartbeat is the shared one, as before. Status
   * changes (`broadcastStatus`) stay one message to every tab.
   * @param {boolean} ack
   */
  heartbeat (ack) {
    const tab = this.tab
    const followers = this.roster.list().slice(1)
    if (followers.some(t => !this.inboxTabs.has(t))) {
      this.broadcastStatus(ack)
      return
    }
    this.clearSlots()
    tab.tabs = this.roster.size
    const msg = { t: BUS.hb, ...this.payload(), ack }
    const slots = Math.max(1, Math.min(tab.opts.tabHeartbeatSlots, followers.length))
    const step = tab.opts.tabHeartbeatMs / slots
    for (let k = 0; k < slots; k++) {
      const group = followers.filter((_, i) => i % slots === k)
      const send = () => {
        for (const to of group) if (this.roster.has(to)) tab.bus.post({ ...msg, to }, { keep: true })
      }
      if (k === 0) send()
      else this.slotTimers.push(setTimeout(send, Math.round(k * step)))
    }
    tab.emitStatus()
  }

  clearSlots () {
    for (const t of this.slotTimers) clearTimeout(t)
    this.slotTimers = []
  }

  /**
   * Waits for `from`'s tab lock (it told us it holds it): the grant means the tab closed or
   * crashed, so its streams are cancelled at once instead of after `tabMaxMissed` heartbeats.
   * @param {string} from
   */
  watch (from) {
    const locks = this.tab.env.locks
    if (!locks || this.watchFailed || this.watches.has(from) || !this.roster.has(from)) return
    const ctl = new AbortController()
    this.watches.set(from, ctl)
    locks.request(tabLockName(this.tab.name, from), { mode: 'exclusive', signal: ctl.signal }, () => {
      if (this.watches.get(from) !== ctl) return undefined
      this.watches.delete(from)
      // a closing tab's `bye` usually comes first; else it crashed (no pagehide)
      if (this.roster.has(from)) this.dropTab(from, 'vanished')
      return undefined // hand the lock straight back: the tab id is not reused
    }).catch((err) => {
      if (this.watches.get(from) !== ctl) return
      this.watches.delete(from)
      if (err?.name !== 'AbortError') this.watchFailed = true
    })
  }

  /** @param {string} tab */
  unwatch (tab) {
    const ctl = this.watches.get(tab)
    this.watches.delete(tab)
    ctl?.abort()
  }

  /** A follower left (`bye`) or stopped answering: cancel its streams upstream. */
  dropTab (gone, reason) {
    const tab = this.tab
    this.roster.leave(gone)
    this.unwatch(gone)
    this.flushOutbox() // its last frames (and the tab_gone below) before the handle closes
    for (const route of this.owner.router.routesOf(gone)) {
      this.owner.cancel(route.id)
      if (reason === 'vanished') {
        this.owner.router.markVanished(route.id)
        this.owner.deliverTo(gone, { type: FRAME.error, id: route.id, code: CLIENT_ERROR_CODE.tabGone, message: TAB_GONE })
      }
    }
    if (reason === 'vanished') this.flushOutbox()
    tab.bus.forget(gone)
    tab.tabs = this.roster.size
    tab.emitStatus()
  }

  /**
   * @param {boolean} [ack] every follower answers (else only those whose tab lock we do not
   *   watch: a status change needs no answer)
   */
  broadcastStatus (ack = false) {
    const tab = this.tab
    tab.tabs = this.roster.size
    tab.bus.post({ t: BUS.hb, ...this.payload(), ack })
    tab.emitStatus()
  }

  /**
   * The socket's state changed: the followers hear it. Not the first `connecting` (the claim
   * said so), and the first `open` a moment later (with the next joins' status), not in the
   * same task as `welcome`: 29 tabs woken to re-render their status just before the replay
   * reached them held it up; a follower with streams learns the handover is over from its
   * replayed frames.
   */
  connectionChanged () {
    // stepping down: the `resign` says so (a `closed` heartbeat first woke every tab for nothing)
    if (this.stopping) return
    const state = this.tab.connection
    if (!this.announcedOpen) {
      if (state === CONNECTION.connecting) return
      if (state === CONNECTION.open) {
        this.announcedOpen = true
        this.soonBroadcastStatus()
        return
      }
    }
    this.broadcastStatus()
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
    }, this.tab.opts.tabHeartbeatMs / 10)
  }

  payload () {
    const tab = this.tab
    return {
      v: BUS_VERSION,
      epoch: this.epoch,
      roster: this.roster.list(),
      tabs: this.roster.size,
      connection: this.collecting ? CONNECTION.connecting : tab.connection,
      user: tab.user,
      tier: tab.tier,
      visible: tab.isVisible(),
    }
  }

  /** The leader's message for one follower: to its inbox, or (older shim) the shared channel. */
  toTab (to, msg) {
    if (this.inboxTabs.has(to)) return this.tab.bus.post(msg, { keep: true })
    return this.tab.bus.post(msg, { shared: true })
  }

  /**
   * A frame for a follower goes into its batch, which goes to its inbox at the end of the
   * socket message it came in, when the gateway batches (one message is one gateway write:
   * all the frames it had ready); else at the end of this task, with the frames of the
   * socket messages that arrive before then (a replay after a handover reaches each tab in
   * a few messages). Either way a tab reads one bus message for what one task routed to it.
   * @param {string} to @param {any} frame
   */
  forward (to, frame) {
    const batch = this.outbox.get(to)
    if (batch) batch.push(frame)
    else this.outbox.set(to, [frame])
    if (this.owner.socket.delivering) return // onBatchEnd flushes
    if (!this.flushQueued) {
      this.flushQueued = true
      this.nextTask(() => this.flushOutbox())
    }
  }

  flushOutbox () {
    this.flushQueued = false
    if (this.outbox.size === 0) return
    const bus = this.tab.bus
    const outbox = this.outbox
    this.outbox = new Map()
    for (const [to, frames] of outbox) {
      const n = (this.posted.get(to) ?? 0) + 1
      this.posted.set(to, n)
      if (this.inboxTabs.has(to)) bus.post({ t: BUS.frames, to, n, frames }, { keep: true })
      else for (const frame of frames) bus.post({ t: BUS.frame, to, frame }, { shared: true })
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
      } else {
        this.hop = (f) => setTimeout(f, 0)
      }
    }
    this.hop(fn)
  }

  /** @param {any} m a bus message from another tab */
  onBus (m) {
    const tab = this.tab
    const from = m.from
    switch (m.t) {
      case BUS.join:
        if (m.v >= 2) this.inboxTabs.add(from)
        else this.inboxTabs.delete(from)
        if (this.roster.touch(from, { visible: m.visible })) tab.tabs = this.roster.size
        this.adopt(from, m.streams, { fromOwner: true, read: m.read })
        if (m.lock === true) this.watch(from)
        if (this.collecting) {
          this.collecting.expected.delete(from)
          if (this.collecting.expected.size === 0) this.finishCollecting()
        }
        this.soonBroadcastStatus()
        return
      case BUS.open:
        if (this.roster.touch(from)) this.soonBroadcastStatus()
        if (m.frame && typeof m.frame.id === 'string') this.owner.open(from, m.frame)
        return
      case BUS.cancel:
        if (this.owner.router.get(m.id)?.tab === from) this.owner.cancel(m.id)
        return
      case BUS.bye:
        this.dropTab(from, 'bye')
        this.soonBroadcastStatus()
        return
      case BUS.ack:
        if (this.roster.ack(from, { visible: m.visible }) && m.lock === true) this.watch(from)
        return
      case BUS.probe:
        this.roster.ack(from)
        this.toTab(from, { t: BUS.pong, to: from, ...this.payload() })
        return
      case BUS.claim:
      case BUS.hb:
        // Another tab leads with a later epoch: our lock was stolen (its rejection may lag).
        if (compareEpochs(m.epoch, this.epoch) > 0) tab.deposed(m)
        return
      case BUS.resign:
        // the last leader's table arrived after the lock did, or a deposed leader's (it was
        // stuck when we took over): streams we lack
        if (this.collecting && from === this.collecting.after) {
          this.inherited = { from, posted: m.posted ?? {} }
          this.owner.socket.seedToken(m.token)
          if (Array.isArray(m.inbox)) for (const t of m.inbox) this.inboxTabs.add(t)
        }
        this.adopt(from, m.streams, { fromOwner: false })
        if (this.collecting && from === this.collecting.after) this.finishCollecting()
        return
      default:
    }
  }
}
