import { ERROR_CODE } from './constants.js'

/**
 * The one error type the shim rejects with. `code` is a protocol error code
 * (`ERROR_CODE`) or one of the shim's own (`CLIENT_ERROR_CODE`). When the upstream caused it,
 * `status` is the upstream's HTTP status and `upstream` what its error body said
 * (`type`, `code`, `param`), so an app can tell `context_length_exceeded` from the rest.
 *
 * @example
 * try {
 *   for await (const text of mux.chat({ model, messages })) out.append(text)
 * } catch (err) {
 *   if (err.code === 'rate_limited') retryIn(err.retryAfterMs)
 *   else if (err.upstream?.code === 'context_length_exceeded') shortenHistory()
 *   else show(err.message)
 * }
 */
export default class MuxError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{id?: string|null, retryAfterMs?: number, status?: number,
   *   upstream?: {type?: string, code?: string, param?: string}}} [details]
   */
  constructor (code, message, { id = null, retryAfterMs, status, upstream } = {}) {
    super(message || code)
    this.name = 'MuxError'
    /** @type {string} */
    this.code = code
    /** The stream this error is about, or null for the connection. */
    this.id = id
    if (retryAfterMs != null) this.retryAfterMs = retryAfterMs
    if (typeof status === 'number') this.status = status
    const said = upstreamSaid(upstream)
    if (said) this.upstream = said
  }

  /**
   * Builds the error an `error` frame describes.
   * Also reads what `toJSON` wrote, which has the frame's shape.
   * @param {{code?: string, message?: string, id?: string|null, retry_after_ms?: number,
   *   status?: number, upstream?: object}} frame
   * @returns {MuxError}
   */
  static fromFrame (frame) {
    return new MuxError(frame.code || ERROR_CODE.internal, frame.message || frame.code, {
      id: frame.id ?? null,
      retryAfterMs: frame.retry_after_ms,
      status: frame.status,
      upstream: frame.upstream,
    })
  }

  /**
   * A plain object in the `error` frame's shape, that survives `postMessage` (Error subclasses
   * lose their fields) and that `fromFrame` turns back into this error.
   */
  toJSON () {
    const json = { code: this.code, message: this.message, id: this.id, retry_after_ms: this.retryAfterMs }
    if (this.status !== undefined) json.status = this.status
    if (this.upstream !== undefined) json.upstream = { ...this.upstream }
    return json
  }
}

/**
 * The `upstream` object of an error frame, keeping only string `type`, `code` and `param`
 * (a numeric `code`, which some upstreams send, as its decimal string); null when none is left.
 * @param {unknown} upstream
 * @returns {{type?: string, code?: string, param?: string}|null}
 */
function upstreamSaid (upstream) {
  if (!upstream || typeof upstream !== 'object') return null
  const said = {}
  for (const key of ['type', 'code', 'param']) {
    const v = upstream[key]
    if (typeof v === 'string') said[key] = v
    else if (key === 'code' && typeof v === 'number' && Number.isFinite(v)) said[key] = String(v)
  }
  return Object.keys(said).length > 0 ? said : null
}
