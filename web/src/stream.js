import { CLIENT_ERROR_CODE, DEFAULTS, ERROR_CODE, FRAME } from './constants.js'
import MuxError from './errors.js'

/**
 * One answer being streamed into this tab: an async iterable of text deltas.
 *
 * The tab that owns a stream is the one place that knows which `seq` it has shown, so the
 * dedupe lives here: after a reconnect or a change of leader the gateway replays from the
 * last `seq` this tab reported, and any frame at or below it is dropped. Frames that arrive
 * ahead of a gap wait (bounded) until the gap is filled.
 *
 * @example
 * const s = mux.chat({ model: 'deepseek-v3.2', messages })
 * for await (const text of s) out.textContent += text   // `break` cancels the stream
 * const { usage, finish_reason, cost_usd } = await s.result
 */
export default class ChatStream {
  /**
   * @param {string} id
   * @param {object} openFrame the `open` frame, kept to re-send it if it never reached the gateway
   * @param {{onCancel?: (id: string) => void, onChange?: (s: ChatStream) => void, maxHeld?: number,
   *   gapTimeoutMs?: number}} [hooks]
   */
  constructor (id, openFrame, { onCancel, onChange, maxHeld = DEFAULTS.maxHeldFrames, gapTimeoutMs = DEFAULTS.gapTimeoutMs } = {}) {
    /** The logical stream id, `<tab id>:<n>`. */
    this.id = id
    this.openFrame = openFrame
    /** Last `seq` applied (delta or done); what this tab resumes after. */
    this.lastSeq = 0
    /** 1-based position while the gateway queues the stream for an upstream slot, else null. */
    this.position = null
    /** Model the gateway answered with (from `start`). */
    this.model = null
    /** True once `done`, `error` or cancel ended it. */
    this.ended = false
    /** True when `cancel()` (not the gateway) ended it. */
    this.cancelledLocally = false
    this.onCancel = onCancel
    this.onChange = onChange
    this.maxHeld = maxHeld
    this.gapTimeoutMs = gapTimeoutMs
    /** Set while the terminal frame waits behind a gap. */
    this.gapTimer = undefined
    /** @type {Map<number, object>} frames with seq > lastSeq + 1, by seq */
    this.held = new Map()
    /** @type {string[]} text not yet read by the consumer */
    this.queue = []
    /** @type {Array<(r: IteratorResult<string>) => void>} */
    this.waiters = []
    /** @type {Array<(e: Error) => void>} */
    this.failers = []
    /** @type {MuxError|null} error to throw to the iterator (not set for a cancel) */
    this.failure = null
    this.result = new Promise((resolve, reject) => {
      this.resolveResult = resolve
      this.rejectResult = reject
    })
    // A caller that only iterates must not see an unhandled rejection for `result`.
    this.result.catch(() => {})
  }

  /**
   * Applies one server frame of this stream.
   * @param {any} frame
   * @returns {'applied'|'duplicate'|'held'|'ignored'}
   */
  push (frame) {
    if (this.ended) return 'ignored'
    switch (frame.type) {
      case FRAME.queued:
        this.position = frame.position ?? null
        this.changed()
        return 'applied'
      case FRAME.start:
        this.position = null
        this.model = frame.model ?? null
        this.changed()
        return 'applied'
      case FRAME.delta:
      case FRAME.done:
      case FRAME.error:
        break
      default:
        return 'ignored'
    }
    const seq = frame.seq
    // A terminal error may carry no seq (e.g. refused before it started): it ends the stream.
    if (frame.type === FRAME.error && typeof seq !== 'number') {
      this.apply(frame)
      return 'applied'
    }
    if (typeof seq !== 'number') return 'ignored'
    if (seq <= this.lastSeq) return 'duplicate'
    if (seq > this.lastSeq + 1) {
      if (this.held.has(seq)) return 'duplicate'
      if (this.held.size >= this.maxHeld) {
        this.fail(new MuxError(CLIENT_ERROR_CODE.sequenceGap,
          `stream ${this.id}: seq ${this.lastSeq + 1} never arrived`, { id: this.id }))
        return 'ignored'
      }
      this.held.set(seq, frame)
      if (frame.type !== FRAME.delta && this.gapTimer === undefined) {
        // The end is here but something before it is not: the missing frames can still come
        // (from a leader that is handing over), but not forever.
        this.gapTimer = setTimeout(() => {
          this.fail(new MuxError(CLIENT_ERROR_CODE.sequenceGap,
            `stream ${this.id}: frames after seq ${this.lastSeq} never arrived`, { id: this.id }))
        }, this.gapTimeoutMs)
      }
      return 'held'
    }
    this.apply(frame)
    while (!this.ended && this.held.has(this.lastSeq + 1)) {
      const next = this.held.get(this.lastSeq + 1)
      this.held.delete(this.lastSeq + 1)
      this.apply(next)
    }
    return 'applied'
  }

  /** @param {any} frame a frame in sequence */
  apply (frame) {
    if (typeof frame.seq === 'number') this.lastSeq = frame.seq
    if (this.position !== null) {
      this.position = null
      this.changed()
    }
    if (frame.type === FRAME.delta) {
      if (frame.text) this.emit(frame.text)
    } else if (frame.type === FRAME.done) {
      this.finish()
      this.resolveResult({
        usage: frame.usage ?? null,
        finish_reason: frame.finish_reason ?? null,
        cost_usd: frame.cost_usd ?? null,
      })
    } else if (frame.type === FRAME.error) {
      this.fail(MuxError.fromFrame({ ...frame, id: this.id }))
    }
  }

  /**
   * Ends the stream with `error` (the iterator throws it, `result` rejects).
   * @param {MuxError} error
   */
  fail (error) {
    if (this.ended) return
    // Our own cancel ends the loop quietly; every other end is an error the loop throws.
    if (!(error.code === ERROR_CODE.cancelled && this.cancelledLocally)) this.failure = error
    this.rejectResult(error)
    this.finish()
  }

  /**
   * Stops the stream: the gateway aborts the upstream request, the loop ends quietly and
   * `result` rejects with code `cancelled`. Does nothing once the stream has ended.
   */
  cancel () {
    if (this.ended) return
    this.cancelledLocally = true
    this.queue.length = 0
    this.fail(new MuxError(ERROR_CODE.cancelled, 'cancelled by the client', { id: this.id }))
    this.onCancel?.(this.id)
  }

  /** @param {string} text */
  emit (text) {
    const waiter = this.waiters.shift()
    if (waiter) {
      this.failers.shift()
      waiter({ value: text, done: false })
    } else {
      this.queue.push(text)
    }
  }

  finish () {
    clearTimeout(this.gapTimer)
    this.gapTimer = undefined
    this.ended = true
    this.position = null
    this.held.clear()
    this.changed()
    this.wakeAll()
  }

  wakeAll () {
    if (!this.ended || this.waiters.length === 0) return
    const waiters = this.waiters.splice(0)
    const failers = this.failers.splice(0)
    const failure = this.failure
    this.failure = null
    waiters.forEach((resolve, i) => {
      if (failure && i === 0) failers[i](failure)
      else resolve({ value: undefined, done: true })
    })
  }

  changed () {
    this.onChange?.(this)
  }

  /** @returns {AsyncIterator<string>} */
  [Symbol.asyncIterator] () {
    return {
      next: () => {
        if (this.queue.length > 0) return Promise.resolve({ value: this.queue.shift(), done: false })
        if (this.ended) {
          const failure = this.failure
          if (failure) {
            this.failure = null
            return Promise.reject(failure)
          }
          return Promise.resolve({ value: undefined, done: true })
        }
        return new Promise((resolve, reject) => {
          this.waiters.push(resolve)
          this.failers.push(reject)
        })
      },
      // `break` out of `for await`: the reader wants no more, so stop paying for it.
      return: () => {
        this.cancel()
        return Promise.resolve({ value: undefined, done: true })
      },
    }
  }
}
