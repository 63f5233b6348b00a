/**
 * Tab ids and stream ids. A stream id is `<tab id>:<n>`, so every tab of every browser of
 * one user can open streams without asking anyone, and the leader can tell a stream's tab
 * from its id alone. The protocol allows 1–64 chars of `[A-Za-z0-9._:-]`.
 *
 * @example
 * const tab = makeTabId()      // e.g. "k3f9a2x0qz"
 * const id = streamId(tab, 7)  // "k3f9a2x0qz:7"
 * tabOf(id) === tab            // true
 */

const ALPHABET = '0123456789abcdefghijklmnopqrstuvwxyz'
const TAB_ID_LENGTH = 10
export const STREAM_ID_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/

/**
 * @param {number} n
 * @returns {Uint8Array}
 */
function randomBytes (n) {
  const bytes = new Uint8Array(n)
  if (globalThis.crypto?.getRandomValues) return globalThis.crypto.getRandomValues(bytes)
  for (let i = 0; i < n; i++) bytes[i] = Math.floor(Math.random() * 256)
  return bytes
}

/**
 * A random tab id: 10 base-36 chars (~51 bits), so two tabs of one user never collide in
 * practice. Contains no `:`.
 * @param {(n: number) => Uint8Array} [random]
 * @returns {string}
 */
export function makeTabId (random = randomBytes) {
  const bytes = random(TAB_ID_LENGTH)
  let id = ''
  // 252 is the largest multiple of 36 below 256: rejecting above it keeps chars uniform.
  for (let i = 0; id.length < TAB_ID_LENGTH; i++) {
    const b = i < bytes.length ? bytes[i] : random(1)[0]
    if (b < 252) id += ALPHABET[b % 36]
  }
  return id
}

/**
 * @param {string} tabId
 * @param {number} n this tab's stream counter
 * @returns {string}
 */
export function streamId (tabId, n) {
  const id = `${tabId}:${n}`
  if (!STREAM_ID_PATTERN.test(id)) throw new TypeError(`invalid stream id ${JSON.stringify(id)}`)
  return id
}

/**
 * The tab that owns stream `id`, or null if the id carries no tab prefix.
 * @param {string} id
 * @returns {string|null}
 */
export function tabOf (id) {
  if (typeof id !== 'string') return null
  const i = id.indexOf(':')
  return i > 0 ? id.slice(0, i) : null
}

/**
 * @param {unknown} id
 * @returns {boolean}
 */
export function isValidStreamId (id) {
  return typeof id === 'string' && STREAM_ID_PATTERN.test(id)
}
