/**
 * The tabs' channel: a BroadcastChannel whose messages carry the sender (`from`) and,
 * when meant for one tab only, the receiver (`to`). A tab never sees its own messages, and
 * drops those addressed to another tab before looking at them.
 *
 * @example
 * const bus = new Bus(BroadcastChannel, 'muxgate:wss://gw/v1/ws', tabId, msg => handle(msg))
 * bus.open()
 * bus.post({ t: 'open', frame })           // to every tab (the leader acts on it)
 * bus.post({ t: 'frame', to: 'k3f9', frame })  // to one tab
 */
export default class Bus {
  /**
   * @param {typeof BroadcastChannel} Channel
   * @param {string} name
   * @param {string} tabId
   * @param {(msg: any) => void} onMessage
   */
  constructor (Channel, name, tabId, onMessage) {
    this.Channel = Channel
    this.name = name
    this.tabId = tabId
    this.onMessage = onMessage
    /** @type {BroadcastChannel|null} */
    this.channel = null
  }

  get isOpen () {
    return this.channel !== null
  }

  open () {
    if (this.channel) return
    this.channel = new this.Channel(this.name)
    this.channel.onmessage = (event) => {
      const msg = event.data
      if (!msg || typeof msg !== 'object' || msg.from === this.tabId) return
      if (msg.to && msg.to !== this.tabId) return
      this.onMessage(msg)
    }
  }

  /**
   * @param {{t: string, to?: string} & Record<string, any>} msg
   * @returns {boolean} false when the channel is closed
   */
  post (msg) {
    if (!this.channel) return false
    try {
      this.channel.postMessage({ ...msg, from: this.tabId })
      return true
    } catch {
      return false
    }
  }

  close () {
    if (!this.channel) return
    this.channel.onmessage = null
    this.channel.close()
    this.channel = null
  }
}
