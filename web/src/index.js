/**
 * muxgate browser shim: any number of tabs stream LLM answers at once over one WebSocket.
 *
 * Layout (one class per module, like Phoenix's client):
 * - `constants.js`: protocol frame types, error and close codes, bus messages, defaults.
 * - `errors.js`:    MuxError, the one error type (with the protocol `code`).
 * - `timer.js`:     reconnect backoff with jitter.
 * - `ids.js`:       tab ids and `<tab>:<n>` stream ids.
 * - `stream.js`:    ChatStream, one answer: async iterable, seq dedupe, result.
 * - `router.js`:    the socket owner's table: stream → owning tab, last seq, resume list.
 * - `roster.js`:    the leader's follower tabs and which stopped answering.
 * - `bus.js`:       the BroadcastChannels between tabs (shared, and one inbox per tab).
 * - `election.js`:  leadership with Web Locks (queue, steal, resign) and leader epochs.
 * - `socket.js`:    the WebSocket: hello, heartbeat, reconnect, goaway.
 * - `openai.js`:    the OpenAI chat-completions encoding of a stream (docs/openai-compat.md).
 * - `fetch.js`:     `mux.fetch`, a fetch for the OpenAI SDKs that streams over the shared socket.
 * - `owner.js`:     SocketOwner, a socket and its router (the part a leader and a solo tab share).
 * - `leader.js`:    Leader, the role that owns the socket for every tab: roster, handover.
 * - `follower.js`:  Follower, the role that streams through the leader: join, heartbeats, steal.
 * - `solo.js`:      Solo, the fallback role: a socket of its own.
 * - `mux.js`:       Mux, one tab's handle: its streams and status, delegating to its role.
 *
 * @example
 * import { connect } from './index.js'
 * const mux = connect({ url: '/v1/ws', token: async () => (await fetch('/dev/token')).json().then(t => t.token) })
 * const answer = mux.chat({ model: 'deepseek-v3.2', messages: [{ role: 'user', content: 'Hello!' }] })
 * for await (const text of answer) document.body.append(text)
 * console.log(await answer.result) // { usage, finish_reason, cost_usd }
 */
import Mux from './mux.js'

export { default as Mux } from './mux.js'
export { default as MuxError } from './errors.js'
export { default as ChatStream } from './stream.js'
export { HTTP_ERROR } from './openai.js'
export {
  CLIENT_ERROR_CODE, CLOSE_CODE, CONNECTION, DEFAULTS, ERROR_CODE, FRAME, ROLE, SUBPROTOCOL,
} from './constants.js'

/**
 * Joins (or starts) the shared connection of this origin's tabs.
 * @param {import('./index.d.ts').ConnectOptions} options
 * @returns {Mux}
 */
export function connect (options) {
  return new Mux(options)
}
