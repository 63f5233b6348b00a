/**
 * The tabs' channels. One BroadcastChannel `name` that every tab reads, for what every tab
 * must hear (a claim, the leader's heartbeat, a resign); and one inbox per tab,
 * `name#<tab id>`, for what only one tab must read (its streams' frames, a follower's
 * message to the leader). A message to one tab goes to that tab's inbox only, so N tabs
 * streaming wake N tabs per frame, not N² (a BroadcastChannel wakes every reader).
 *
 * Every BroadcastChannel object of a name hears what is posted on it, listener or not, so a
 * tab keeps a handle on another tab's inbox only where it is the only one to (the leader, on
 * its followers' inboxes: `keep`); a follower writing to the leader opens a handle, posts and
 * closes it, else every follower's handle on the leader's inbox would wake for every ack.
 *
 * Messages carry the sender (`from`); a tab never sees its own.
 *
 * @example
 * const bus = new Bus(BroadcastChannel, 'muxgate:wss://gw/v1/ws', tabId, msg => handle(msg))
 * bus.open()
 * bus.post({ t: 'claim', epoch })                // to every tab
 * bus.post({ t: 'frames', to: 'k3f9', frames }, { keep: true })  // to tab k3f9 only
 * bus.post({ t: 'ack', to: leaderId })           // to the leader only
 */
export default class Bus {
  /**
   * @param {typeof BroadcastChannel} Channel
   * @param {string} name
   * @param {string} tabId
   * @param {(msg: any) => void} onMessage
   * @param {{maxOutboxes?: number}} [opts]
   */
  constructor (Channel, name, tabId, onMessage, { maxOutboxes = 256 } = {}) {
    this.Channel = Channel
    this.name = name
    this.tabId = tabId
    this.onMessage = onMessage
    /** @type {BroadcastChannel|null} every tab's channel */
    this.channel = null
    /** @type {BroadcastChannel|null} this tab's inbox */
    this.inbox = null
    /**
     * Open handles on other tabs' inboxes, most recently used last. Bounded: a leader of many
     * short-lived tabs must not keep a channel per tab it ever served.
     * @type {Map<string, BroadcastChannel>}
     */
    this.outboxes = new Map()
    this.maxOutboxes = maxOutboxes
  }

  get isOpen () {
    return this.channel !== null
  }

  /** The channel name of `tab`'s inbox. @param {string} tab */
  inboxName (tab) {
    return `${this.name}#${tab}`
  }

  open () {
    if (this.channel) return
    const receive = (event) => {
      const msg = event.data
      if (!msg || typeof msg !== 'object' || msg.from === this.tabId) return
      if (msg.to && msg.to !== this.tabId) return
      this.onMessage(msg)
    }
    this.channel = new this.Channel(this.name)
    this.channel.onmessage = receive
    this.inbox = new this.Channel(this.inboxName(this.tabId))
    this.inbox.onmessage = receive
  }

  /**
   * @param {{t: string, to?: string} & Record<string, any>} msg `to`: one tab's inbox, else all
   * @param {{keep?: boolean, shared?: boolean}} [how] keep: keep the handle on `to`'s inbox
   *   open for the next message; shared: send on the shared channel even with `to` (for a tab
   *   of an older shim that reads no inbox)
   * @returns {boolean} false when the channel is closed
   */
  post (msg, { keep = false, shared = false } = {}) {
    if (!this.channel) return false
    const data = { ...msg, from: this.tabId }
    try {
      if (!msg.to || shared) {
        this.channel.postMessage(data)
      } else if (keep) {
        this.outbox(msg.to).postMessage(data)
      } else {
        const once = new this.Channel(this.inboxName(msg.to))
        once.postMessage(data)
        once.close()
      }
      return true
    } catch {
      return false
    }
  }

  /** @param {string} tab */
  outbox (tab) {
    let channel = this.outboxes.get(tab)
    if (channel) {
      this.outboxes.delete(tab)
    } else {
      channel = new this.Channel(this.inboxName(tab))
      if (this.outboxes.size >= this.maxOutboxes) {
        const [oldest, old] = this.outboxes.entries().next().value
        this.outboxes.delete(oldest)
        old.close()
      }
    }
    this.outboxes.set(tab, channel)
    return channel
  }

  /** Closes every kept handle (this tab stops leading). */
  forgetAll () {
    for (const channel of this.outboxes.values()) channel.close()
    this.outboxes.clear()
  }

  /** Closes the handle on `tab`'s inbox (the tab left). @param {string} tab */
  forget (tab) {
    const channel = this.outboxes.get(tab)
    if (!channel) return
    this.outboxes.delete(tab)
    channel.close()
  }

  close () {
    if (!this.channel) return
    for (const ch of [this.channel, this.inbox, ...this.outboxes.values()]) {
      if (!ch) continue
      ch.onmessage = null
      ch.close()
    }
    this.outboxes.clear()
    this.channel = null
    this.inbox = null
  }
}
