/**
 * Leader epochs order leaders: a higher one replaced a lower one. `n` is the time the tab
 * took the lock (ms since 1970), or one above the highest epoch it has heard if that is later,
 * so two tabs that take the lock one after the other without hearing of each other still get
 * epochs in the order of the lock (the tabs share one clock); the tab id breaks a tie.
 * @typedef {{n: number, tab: string}} Epoch
 */

/** @param {Epoch|null} a @param {Epoch|null} b @returns {-1|0|1} */
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

/**
 * The lock a tab holds for as long as it takes part (`name` is the election's lock). The
 * leader queues a request for each follower's: the grant means that tab closed or its
 * renderer died (the browser frees a dead page's locks), at once and without any heartbeat.
 * @param {string} name @param {string} tab @returns {string}
 */
export function tabLockName (name, tab) {
  return `${name}:tab:${tab}`
}

/**
 * Leadership among the tabs of one origin, with the Web Locks API: the tab holding the
 * exclusive lock `name` is the leader. Other tabs wait in the lock's queue, so when the
 * leader releases it (or its page dies) the next tab is granted it at once. A leader that
 * is frozen or hung never releases it: a follower then takes it with `steal`, and the old
 * holder learns it was deposed when its request rejects.
 *
 * @example
 * const election = new Election(navigator.locks, 'muxgate:wss://gw/v1/ws', {
 *   onElected: how => becomeLeader(how),   // 'available' | 'queued' | 'stolen'
 *   onDeposed: () => stepDown(),
 * })
 * if (!(await election.tryAcquire())) election.queue()
 */
export default class Election {
  /**
   * @param {LockManager} locks
   * @param {string} name
   * @param {{onElected: (how: string) => void, onDeposed: () => void}} hooks
   */
  constructor (locks, name, { onElected, onDeposed }) {
    this.locks = locks
    this.name = name
    this.onElected = onElected
    this.onDeposed = onDeposed
    /** True while this tab holds the lock. */
    this.holding = false
    /** Resolves the promise that keeps the lock held. */
    this.releaseHold = null
    /** Aborts this tab's waiting request. */
    this.waiting = null
    /** Bumped per grant, so a rejection from an older grant is not taken for the current one. */
    this.grant = 0
    /** Set by `stop()`: grants that still arrive are handed straight back. */
    this.stopped = false
  }

  /**
   * Takes the lock if nobody holds it. Resolves true when this tab is now the leader.
   * @returns {Promise<boolean>}
   */
  tryAcquire () {
    this.stopped = false
    return new Promise((resolve) => {
      this.request({ ifAvailable: true }, 'available', resolve)
    })
  }

  /** Waits in the lock's queue; `onElected('queued')` when granted. */
  queue () {
    this.stopped = false
    if (this.holding || this.waiting) return
    const waiting = new AbortController()
    this.waiting = waiting
    this.request({ signal: waiting.signal }, 'queued', null, waiting)
  }

  /** Takes the lock from its holder (frozen, hung, or hidden while this tab is visible). */
  steal () {
    this.stopped = false
    if (this.holding) return
    this.unqueue()
    this.request({ steal: true }, 'stolen', null)
  }

  /**
   * @param {LockOptions} options
   * @param {string} how
   * @param {((got: boolean) => void)|null} answer for `ifAvailable`
   * @param {AbortController} [waiting]
   */
  request (options, how, answer, waiting) {
    let grant = 0
    this.locks.request(this.name, { mode: 'exclusive', ...options }, (lock) => {
      if (this.waiting === waiting) this.waiting = null
      if (!lock) {
        answer?.(false)
        return undefined
      }
      if (this.stopped || this.holding) {
        answer?.(false)
        return undefined
      }
      grant = ++this.grant
      this.holding = true
      const held = new Promise((resolve) => { this.releaseHold = resolve })
      answer?.(true)
      this.onElected(how)
      return held
    }).catch(() => {
      if (this.waiting === waiting) this.waiting = null
      // AbortError: a waiting request was withdrawn (nothing to do), or the lock we held
      // was stolen (we are no longer leader).
      if (grant !== 0 && grant === this.grant && this.holding) {
        this.holding = false
        this.releaseHold?.()
        this.releaseHold = null
        this.onDeposed()
      }
      answer?.(false)
    })
  }

  /** Withdraws the waiting request, if any. */
  unqueue () {
    const waiting = this.waiting
    this.waiting = null
    waiting?.abort()
  }

  /** Releases the lock if held; the next tab in the queue becomes leader. */
  resign () {
    if (!this.holding) return
    this.holding = false
    this.grant++
    const release = this.releaseHold
    this.releaseHold = null
    release?.()
  }

  /** Leaves the election: withdraws from the queue and releases the lock. */
  stop () {
    this.stopped = true
    this.unqueue()
    this.resign()
  }
}
