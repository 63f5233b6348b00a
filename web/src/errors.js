import { ERROR_CODE } from './constants.js'

/**
 * The one error type the shim rejects with. `code` is a protocol error code
 * (`ERROR_CODE`) or one of the shim's own (`CLIENT_ERROR_CODE`).
 *
 * @example
 * try {
 *   for await (const text of mux.chat({ model, messages })) out.append(text)
 * } catch (err) {
 *   if (err.code === 'rate_limited') retryIn(err.retryAfterMs)
 *   else show(err.message)
 * }
 */
export default class MuxError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {{id?: string|null, retryAfterMs?: number}} [details]
   */
  constructor (code, message, { id = null, retryAfterMs } = {}) {
    super(message || code)
    this.name = 'MuxError'
    /** @type {string} */
    this.code = code
    /** The stream this error is about, or null for the connection. */
    this.id = id
    if (retryAfterMs != null) this.retryAfterMs = retryAfterMs
  }

  /**
   * Builds the error an `error` frame describes.
   * @param {{code?: string, message?: string, id?: string|null, retry_after_ms?: number}} frame
   * @returns {MuxError}
   */
  static fromFrame (frame) {
    return new MuxError(frame.code || ERROR_CODE.internal, frame.message || frame.code, {
      id: frame.id ?? null,
      retryAfterMs: frame.retry_after_ms,
    })
  }

  /** A plain object that survives `postMessage` (Error subclasses lose their fields). */
  toJSON () {
    return { code: this.code, message: this.message, id: this.id, retry_after_ms: this.retryAfterMs }
  }
}
