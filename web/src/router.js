import { DEFAULTS, ERROR_CODE, FRAME } from './constants.js'

/**
 * @typedef {object} Route
 * @property {string} id       stream id
 * @property {string} tab      the tab that owns the stream and gets its frames
 * @property {object} open     the `open` frame, to send (again) when the gateway lacks it
 * @property {number} lastSeq  highest `seq` forwarded to the tab (resume point)
 * @property {boolean} sent    the gateway may know this stream: resume it, don't open it
 * @property {boolean} cancelled the tab gave it up; cancel it once a connection carries it
 * @property {number} [hello]  the hello whose `resume` listed it
 */

/**
 * The socket owner's table of live streams: which tab owns each, how far each got, and
 * whether the gateway has it. The leader routes every server frame through it, so a frame
 * reaches only the tab that owns its stream, and a replayed frame it already forwarded is
 * dropped here instead of crossing the bus.
 *
 * @example
 * const router = new Router()
 * router.add('tabA', { type: 'open', id: 'tabA:1', model, messages })
 * router.route({ type: 'delta', id: 'tabA:1', seq: 1, text: 'Hi' }) // { tab: 'tabA', frame }
 * router.resumeList(1) // [{ id: 'tabA:1', after: 1 }] once it was sent
 */
export default class Router {
  /** @param {{tombstoneLimit?: number}} [opts] */
  constructor ({ tombstoneLimit = DEFAULTS.tombstoneLimit } = {}) {
    /** @type {Map<string, Route>} */
    this.streams = new Map()
    /** Ended ids and why, oldest first, bounded: late frames for them are dropped quietly. */
    this.tombstones = new Map()
    this.tombstoneLimit = tombstoneLimit
    /**
     * Ids the gateway is about to answer `not_found` for (a resume it did not know), which
     * the router already dealt with at `welcome`: that answer must not end the re-opened stream.
     */
    this.expectNotFound = new Set()
  }

  get size () {
    return this.streams.size
  }

  /** @param {string} id */
  get (id) {
    return this.streams.get(id)
  }

  /** @param {string} id */
  has (id) {
    return this.streams.has(id)
  }

  /**
   * @param {string} tab
   * @param {{id: string}} open
   * @param {{lastSeq?: number, sent?: boolean, cancelled?: boolean}} [state]
   * @returns {Route|null} null when the id is already routed
   */
  add (tab, open, { lastSeq = 0, sent = false, cancelled = false } = {}) {
    if (this.streams.has(open.id)) return null
    this.tombstones.delete(open.id)
    const route = { id: open.id, tab, open, lastSeq, sent, cancelled }
    this.streams.set(open.id, route)
    return route
  }

  /** Streams not sent to the gateway yet, in the order they were added. */
  pending () {
    return [...this.streams.values()].filter(r => !r.sent && !r.cancelled)
  }

  pendingCount () {
    let n = 0
    for (const r of this.streams.values()) if (!r.sent && !r.cancelled) n++
    return n
  }

  /** @param {string} tab */
  routesOf (tab) {
    return [...this.streams.values()].filter(r => r.tab === tab)
  }

  /** Tabs that own at least one stream. */
  tabs () {
    return new Set([...this.streams.values()].map(r => r.tab))
  }

  /**
   * Where a server frame goes, or null to drop it: unknown or ended stream, a replayed
   * frame already forwarded, or a frame of a stream its tab has cancelled.
   * @param {any} frame
   * @returns {{tab: string, frame: any}|null}
   */
  route (frame) {
    const id = frame.id
    if (frame.type === FRAME.error && frame.code === ERROR_CODE.notFound && this.expectNotFound.delete(id)) {
      return null
    }
    const route = this.streams.get(id)
    if (!route) return null
    if (typeof frame.seq === 'number') {
      if (frame.seq <= route.lastSeq) return null
      route.lastSeq = frame.seq
    }
    const terminal = frame.type === FRAME.done || frame.type === FRAME.error
    if (terminal) this.remove(id, route.vanished ? 'vanished' : 'ended')
    if (route.cancelled) return null
    return { tab: route.tab, frame }
  }

  /**
   * The `hello.resume` list: every stream the gateway may have, after its last forwarded seq.
   * @param {number} hello an id for this hello, matched by `afterWelcome`
   */
  resumeList (hello) {
    const list = []
    for (const r of this.streams.values()) {
      if (!r.sent) continue
      r.hello = hello
      list.push({ id: r.id, after: r.lastSeq })
    }
    return list
  }

  /**
   * Settles the streams that `hello` asked to resume, given the ids `welcome.resumed` lists.
   * A stream the gateway lacks is sent again if its tab has seen nothing of it yet (the
   * `open` may never have arrived), else it is lost. Returns what the caller must do.
   * @param {number} hello
   * @param {string[]} resumedIds
   * @returns {{lost: Route[], cancel: Route[], renew: boolean}}
   */
  afterWelcome (hello, resumedIds) {
    const resumed = new Set(resumedIds)
    const lost = []
    const cancel = []
    let renew = false
    for (const r of [...this.streams.values()]) {
      if (!r.sent) continue
      if (r.hello !== hello) {
        // became known as sent after this hello went out: only a new hello can resume it
        renew = true
        continue
      }
      if (resumed.has(r.id)) {
        if (r.cancelled) cancel.push(r)
        continue
      }
      this.expectNotFound.add(r.id)
      if (r.cancelled) {
        this.remove(r.id, 'ended')
      } else if (r.lastSeq === 0 && r.open) {
        r.sent = false
      } else {
        this.remove(r.id, 'lost')
        lost.push(r)
      }
    }
    return { lost, cancel, renew }
  }

  /**
   * @param {string} id
   * @param {string} reason kept as the tombstone
   * @returns {Route|undefined}
   */
  remove (id, reason) {
    const route = this.streams.get(id)
    this.streams.delete(id)
    this.tombstones.delete(id)
    this.tombstones.set(id, reason)
    if (this.tombstones.size > this.tombstoneLimit) {
      this.tombstones.delete(this.tombstones.keys().next().value)
    }
    return route
  }

  /**
   * Marks a stream its tab gave up: its frames are dropped from now on, and it is cancelled
   * once a connection carries it.
   * @param {string} id
   */
  cancel (id) {
    const route = this.streams.get(id)
    if (route) route.cancelled = true
  }

  /** The gateway has the `open` of `id` now. @param {string} id */
  markSent (id) {
    const route = this.streams.get(id)
    if (route) route.sent = true
  }

  /**
   * The owning tab stopped answering: the stream's end (or, once ended, a late frame's
   * drop) is remembered as `vanished`, so the tab, when back, learns why it lost it.
   * @param {string} id
   */
  markVanished (id) {
    const route = this.streams.get(id)
    if (route) route.vanished = true
    else this.tombstones.set(id, 'vanished')
  }

  /**
   * Lowers the resume point of `id` to `after` (its tab has shown less than was forwarded).
   * @param {string} id @param {number} after
   * @returns {boolean} whether it was lowered
   */
  rewind (id, after) {
    const route = this.streams.get(id)
    if (!route || !(after < route.lastSeq)) return false
    route.lastSeq = after
    return true
  }

  /**
   * Ends every stream (the socket gave up for good) and returns those whose tabs must hear
   * of it (the cancelled ones need nothing more).
   * @param {string} reason kept as the tombstone
   * @returns {Route[]}
   */
  clear (reason) {
    const ended = []
    for (const route of [...this.streams.values()]) {
      this.remove(route.id, reason)
      if (!route.cancelled) ended.push(route)
    }
    return ended
  }

  /** @param {string} id */
  tombstone (id) {
    return this.tombstones.get(id)
  }

  /**
   * The table as plain objects, for the next leader (`resign`).
   * @param {(r: Route) => boolean} [keep]
   */
  snapshot (keep = () => true) {
    return [...this.streams.values()].filter(keep).map(r => ({
      id: r.id, tab: r.tab, open: r.open, after: r.lastSeq, sent: r.sent, cancelled: r.cancelled,
    }))
  }
}
