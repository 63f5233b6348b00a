import { DEFAULTS } from './constants.js'

/**
 * The leader's list of follower tabs, and which of them stopped answering. Liveness is
 * counted in the leader's own heartbeats (unanswered ones per tab), never in wall time, so a
 * leader whose timers the browser throttles does not mistake slowness for death.
 *
 * @example
 * const roster = new Roster('leaderTab', { maxMissed: 4 })
 * roster.touch('tabB')
 * roster.beat() // [] — tabB has missed 1
 * roster.ack('tabB') // back to 0
 */
export default class Roster {
  /**
   * @param {string} self the leader's own tab id
   * @param {{maxMissed?: number}} [opts]
   */
  constructor (self, { maxMissed = DEFAULTS.tabMaxMissed } = {}) {
    this.self = self
    this.maxMissed = maxMissed
    /** @type {Map<string, {missed: number, visible: boolean}>} */
    this.members = new Map()
  }

  /** Tabs sharing the socket, the leader included. */
  get size () {
    return this.members.size + 1
  }

  /**
   * Notes that `tab` is alive. Returns true when it was not a member.
   * @param {string} tab
   * @param {{visible?: boolean}} [info]
   */
  touch (tab, info = {}) {
    if (tab === this.self) return false
    const m = this.members.get(tab)
    if (m) {
      m.missed = 0
      if (info.visible !== undefined) m.visible = info.visible
      return false
    }
    this.members.set(tab, { missed: 0, visible: info.visible ?? true })
    return true
  }

  /**
   * A member answered a heartbeat. A tab that is not a member (it was dropped while silent)
   * is not let back in by an ack: it must `join` again, saying which streams it still has.
   * @param {string} tab
   * @param {{visible?: boolean}} [info]
   * @returns {boolean} whether `tab` is a member
   */
  ack (tab, info) {
    if (!this.members.has(tab)) return tab === this.self
    this.touch(tab, info)
    return true
  }

  /** @param {string} tab */
  has (tab) {
    return tab === this.self || this.members.has(tab)
  }

  /** @param {string} tab */
  leave (tab) {
    return this.members.delete(tab)
  }

  /**
   * One heartbeat went out: counts it as unanswered for every member, and removes and
   * returns the members that have now missed more than `maxMissed`. `weight` says how many
   * heartbeats it adds to a member's count, given its count so far (a follower asked for an
   * ack only every k-th beat: 0 on the other beats, 1 when it answered the last ask, k when
   * it did not, so it is dropped after about as long a silence as one asked every beat).
   * @param {(tab: string, missed: number) => number} [weight]
   * @returns {string[]}
   */
  beat (weight = () => 1) {
    const vanished = []
    for (const [tab, m] of this.members) {
      m.missed += weight(tab, m.missed)
      if (m.missed > this.maxMissed) vanished.push(tab)
    }
    for (const tab of vanished) this.members.delete(tab)
    return vanished
  }

  /** Every tab id, the leader first. */
  list () {
    return [this.self, ...this.members.keys()]
  }
}
