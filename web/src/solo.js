import SocketOwner from './owner.js'

/**
 * The solo part, where BroadcastChannel or Web Locks are missing (fallback mode): this tab
 * owns a socket of its own and carries only its own streams. No bus, no election.
 *
 * @example
 * const solo = new Solo(mux)
 * solo.start()
 * solo.dispatch(stream)
 */
export default class Solo {
  /** @param {import('./mux.js').default} tab */
  constructor (tab) {
    this.tab = tab
    this.owner = new SocketOwner(tab)
  }

  start () {
    this.owner.connect()
  }

  stop () {
    this.owner.stop()
  }

  /** @param {any} stream a ChatStream of this tab */
  dispatch (stream) { this.owner.dispatch(stream) }
  /** @param {string} id */
  cancel (id) { this.owner.cancel(id) }
  /** This tab's streams ended (it is closing). @param {string[]} ids */
  endStreams (ids) { this.owner.cancelAll(ids) }
}
