import { BUS, BUS_VERSION, CONNECTION } from './constants.js'
import { compareEpochs } from './election.js'
import MuxError from './errors.js'

/**
 * The follower's part: it waits in the lock's queue, sends `open`/`cancel` to the leader,
 * answers its heartbeats, and (re)joins every new leader with its streams and the last seq
 * it has shown. It watches the leader: one that stops answering (frozen, hung) or stays
 * hidden while this tab is seen is replaced, one follower at a time (`takeOver`).
 *
 * Silence is counted by a timer re-armed at every word from the leader, not by a timer of
 * its own every period: while the leader beats, the timer never fires, so an idle follower
 * wakes once a heartbeat (to read it), not twice. Without a word for `tabHeartbeatMs` × 1¼
 * (plus up to ¼ of jitter) it counts one silent period, then one more per `tabHeartbeatMs`:
 * it probes at 2, and from `leaderMaxSilent` (4) it takes over, 4¼–4½ periods after the
 * leader's last word (then the stagger of `takeOver`).
 *
 * @example
 * const follower = new Follower(mux)
 * follower.start()                        // queues for the lock, asks who leads (`probe`)
 * follower.onBus({ t: 'hb', from, epoch, roster })   // joins, acks
 * follower.stop()
 */
export default class Follower {
  /**
   * @param {import('./mux.js').default} tab
   * @param {Follower|null} [before] this tab's follower part before (it froze, or followed
   *   again): what it knew of the leader carries over
   */
  constructor (tab, before = null) {
    this.tab = tab
    /** Heartbeat periods without word from the leader. */
    this.silent = 0
    /** Counts every word heard from a leader, so a follower about to steal sees if one came. */
    this.heard = 0
    /** When this tab last sent a `join`. */
    this.joinedAt = 0
    /** After a freeze or a step-down the leader must hear how far our streams got. */
    this.mustJoin = true
    this.beatTimer = undefined
    this.stealTimer = undefined
    /** A join put off until the handover is over (see `joinLater`). */
    this.joinTimer = undefined
    /** Since when the leader says it is hidden, or null. */
    this.leaderHiddenSince = null
    /** The leader reads its inbox (bus version 2): write there, not to every tab. */
    this.leaderReadsInbox = false
    if (before) {
      this.heard = before.heard
      this.joinedAt = before.joinedAt
      this.leaderHiddenSince = before.leaderHiddenSince
      this.leaderReadsInbox = before.leaderReadsInbox
    }
  }

  start () {
    const tab = this.tab
    this.silent = 0
    this.mustJoin = true
    tab.connection = tab.leaderId ? tab.connection : CONNECTION.connecting
    tab.election.queue()
    this.armSilence()
    tab.bus.post({ t: BUS.probe })
    tab.emitStatus()
  }

  stop () {
    clearTimeout(this.beatTimer)
    clearTimeout(this.stealTimer)
    clearTimeout(this.joinTimer)
    this.beatTimer = undefined
    this.stealTimer = undefined
    this.joinTimer = undefined
  }

  /** @param {any} stream a ChatStream of this tab */
  dispatch (stream) {
    if (!this.tab.leaderId) return // no leader yet: the stream goes out with our `join`
    stream.dispatched = true
    this.toLeader({ t: BUS.open, frame: stream.openFrame })
  }

  /** @param {string} id */
  cancel (id) {
    this.toLeader({ t: BUS.cancel, id })
  }

  /** This tab's streams ended (it is closing). @param {string[]} ids */
  endStreams (ids) {
    this.toLeader({ t: BUS.bye, ids })
  }

  /** Our tab lock was granted: the leader may watch it instead of counting our acks. */
  onTabLock () {
    if (this.tab.leaderId) this.toLeader({ t: BUS.ack, visible: this.tab.isVisible(), lock: true })
  }

  onVisibility () {
    if (this.tab.leaderId) this.toLeader({ t: BUS.ack, visible: this.tab.isVisible() })
  }

  /** A message for the leader: to its inbox when known, else to every tab. */
  toLeader (msg) {
    const tab = this.tab
    if (!tab.leaderId) return tab.bus.post(msg)
    return tab.bus.post({ ...msg, to: tab.leaderId }, { shared: !this.leaderReadsInbox })
  }

  /**
   * (Re)starts the count of silent periods: the first ends a quarter period after the next
   * heartbeat is due, with up to a quarter more of jitter, so that a heartbeat a little late
   * (a busy leader, a throttled timer) does not count as silence, and so that followers whose
   * leader went quiet do not all wake in the same instant.
   */
  armSilence () {
    const period = this.tab.opts.tabHeartbeatMs
    clearTimeout(this.beatTimer)
    this.beatTimer = setTimeout(() => this.beat(), Math.round(period * (1.25 + Math.random() / 4)))
  }

  /** One more period without word from the leader. */
  beat () {
    const tab = this.tab
    this.silent++
    this.beatTimer = setTimeout(() => this.beat(), tab.opts.tabHeartbeatMs)
    if (this.silent >= tab.opts.leaderMaxSilent) {
      this.takeOver('silent')
    } else if (this.silent >= 2) {
      // heartbeats are late: ask directly (answered from the leader's event loop, which the
      // browser does not throttle like its timers)
      tab.bus.post({ t: BUS.probe })
    }
    this.preferVisible()
  }

  /** Replaces a leader that has been hidden for `preferVisibleMs` while this tab is seen. */
  preferVisible () {
    const tab = this.tab
    if (tab.leaderId && this.leaderHiddenSince !== null && tab.isVisible() &&
        Date.now() - this.leaderHiddenSince >= tab.opts.preferVisibleMs) {
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
    const tab = this.tab
    const step = tab.opts.stealStaggerMs
    const order = tab.knownRoster.filter(t => t !== tab.leaderId)
    let rank = order.indexOf(tab.tabId)
    if (rank < 0) rank = order.length
    if (!tab.isVisible()) rank += order.length + 1
    const delay = Math.round(rank * step + Math.random() * step / 4)
    const epoch = tab.leaderEpoch
    const stillNeeded = () => {
      if (tab.part !== this || !tab.running || tab.frozen) return false
      if (compareEpochs(tab.leaderEpoch, epoch) !== 0) return false // someone took over
      return reason === 'silent'
        ? this.silent >= tab.opts.leaderMaxSilent
        : this.leaderHiddenSince !== null && tab.isVisible()
    }
    this.stealTimer = setTimeout(() => {
      this.stealTimer = undefined
      if (!stillNeeded()) return
      const heard = this.heard
      if (reason === 'silent') tab.bus.post({ t: BUS.probe })
      this.stealTimer = setTimeout(() => {
        this.stealTimer = undefined
        if (!stillNeeded() || (reason === 'silent' && this.heard !== heard)) return
        if (reason === 'silent') {
          // the silent leader will not resign: do not wait for it
          tab.knownRoster = tab.knownRoster.filter(t => t !== tab.leaderId)
        }
        tab.election.steal()
      }, Math.round(step / 2))
    }, delay)
  }

  /** @param {any} m a claim, hb or pong @param {boolean} claim */
  noteLeader (m, claim) {
    const tab = this.tab
    if (!m.epoch || typeof m.epoch.n !== 'number') return
    if (tab.leaderEpoch && compareEpochs(m.epoch, tab.leaderEpoch) < 0) return // a deposed leader
    tab.maxEpochN = Math.max(tab.maxEpochN, m.epoch.n)
    const changed = compareEpochs(m.epoch, tab.leaderEpoch) !== 0
    const lastLeader = tab.leaderId
    tab.leaderEpoch = m.epoch
    tab.leaderId = m.from
    this.leaderReadsInbox = m.v >= 2
    this.silent = 0
    this.heard++
    if (this.beatTimer !== undefined) this.armSilence()
    if (Array.isArray(m.roster)) tab.knownRoster = m.roster
    if (typeof m.tabs === 'number') tab.tabs = m.tabs
    if (m.connection) {
      tab.connection = m.connection
      // what mux.fetch's automatic HTTP fallback asks: has the leader's socket ever been open
      if (m.connection === CONNECTION.open) tab.everOpen = true
      // a handover's end, for a tab without streams to show it (see Mux `statusHold`)
      if (m.connection === CONNECTION.open) {
        tab.releaseStatus(false)
        if (this.joinTimer !== undefined && !changed && !claim) this.join()
      }
    }
    if (m.user !== undefined) tab.user = m.user
    if (m.tier !== undefined) tab.tier = m.tier
    if (m.visible === false) this.leaderHiddenSince ??= Date.now()
    else if (m.visible === true) this.leaderHiddenSince = null
    // checked at each word of the leader (a heartbeat a period), since no timer runs meanwhile
    this.preferVisible()
    // not listed: the leader dropped us, or our join is still on its way (then wait a beat)
    const forgotten = Array.isArray(m.roster) && !m.roster.includes(tab.tabId) &&
      Date.now() - this.joinedAt > tab.opts.tabHeartbeatMs
    if (changed || claim || forgotten || this.mustJoin) {
      this.mustJoin = false
      if (claim && m.table === true && tab.resignListsOwnStreams(lastLeader)) this.joinLater()
      else this.join()
    }
    tab.emitStatus()
  }

  join () {
    const tab = this.tab
    clearTimeout(this.joinTimer)
    this.joinTimer = undefined
    this.joinedAt = Date.now()
    this.toLeader({ t: BUS.join, v: BUS_VERSION, visible: tab.isVisible(), lock: tab.holdsTabLock, streams: tab.ownStreamList(), read: Object.fromEntries(tab.readFrom) })
  }

  /**
   * The new leader resumed from the last leader's table, which lists all our streams: our
   * join changes nothing of the replay, so it goes once the handover is over for this tab
   * (the new leader's first frames here, or its word that its socket is open), at the latest
   * `handoverQuietMs` after the claim. 29 joins read by the new leader between its hello and
   * the replay held the replay up. Only on the claim's word: a leader that got the lock
   * before the table (the crash path) says nothing and waits for the joins, which then come
   * at once (a tab deciding this by itself, on the `resign` it read, made such a leader wait
   * `collectMs` for joins held back).
   */
  joinLater () {
    this.joinedAt = Date.now()
    clearTimeout(this.joinTimer)
    this.joinTimer = setTimeout(() => this.join(), this.tab.opts.handoverQuietMs)
  }

  /** @param {any} m a bus message from another tab */
  onBus (m) {
    const tab = this.tab
    switch (m.t) {
      case BUS.claim:
        tab.dropWarm() // another tab got the lock
        this.noteLeader({ ...m, connection: CONNECTION.connecting }, true)
        return
      case BUS.hb:
        this.noteLeader(m, false)
        // a leader that watches our tab lock asks for an ack only now and then (`ack: false`
        // otherwise), to catch a tab that is stuck; without the lock we answer every one
        if (m.from === tab.leaderId && (m.ack !== false || !tab.holdsTabLock)) {
          this.toLeader({ t: BUS.ack, visible: tab.isVisible() })
        }
        return
      case BUS.pong:
        this.noteLeader(m, false)
        return
      case BUS.connError:
        tab.emit('error', MuxError.fromFrame(m.error ?? {}))
        return
      case BUS.resign:
        tab.noteResign(m)
        return
      case BUS.leaving:
        // our leader's page is closing and we are next in line: handshake while it steps down
        if (m.from === tab.leaderId) tab.warmUp()
        return
      default:
    }
  }
}
