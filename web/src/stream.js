import { CLIENT_ERROR_CODE, DEFAULTS, ERROR_CODE, FRAME, PART } from './constants.js'
import MuxError from './errors.js'

/**
 * One answer being streamed into this tab: an async iterable of text deltas, or with
 * `parts()` of everything the answer carries (reasoning, refusal, text, tool-call fragments).
 *
 * The tab that owns a stream is the one place that knows which `seq` it has shown, so the
 * dedupe lives here: after a reconnect or a change of leader the gateway replays from the
 * last `seq` this tab reported, and any frame at or below it is dropped. Frames that arrive
 * ahead of a gap wait (bounded) until the gap is filled. The whole answer (tool calls merged
 * from their fragments, reasoning, refusal) is assembled here too, from each frame once, so a
 * replay after a handover is never merged twice.
 *
 * @example
 * const s = mux.chat({ model: 'deepseek-v3.2', messages })
 * for await (const text of s) out.textContent += text   // `break` cancels the stream
 * const { usage, finish_reason, cost_usd } = await s.result
 *
 * @example
 * for await (const part of mux.chat({ model, messages, params: { tools } }).parts()) {
 *   if (part.type === 'reasoning') thinking.append(part.text)
 *   else if (part.type === 'text') out.append(part.text)
 * }
 * const { toolCalls, reasoning, refusal, usage } = await s.result
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
    /** @type {object[]} parts not yet read by the consumer (the text iterator skips the others) */
    this.queue = []
    /** @type {Array<{parts: boolean, resolve: (r: IteratorResult<any>) => void, reject: (e: Error) => void}>} */
    this.waiters = []
    /**
     * The whole answer so far, for `result`: tool calls by `index`, the deltas' `logprobs`
     * concatenated.
     * @type {{text: string, reasoning: string, refusal: string|null, logprobs: {content?: object[], refusal?: object[]}|null,
     *   toolCalls: Map<number, {id?: string, type?: string, function: {name: string, arguments: string}}>}}
     */
    this.answer = { text: '', reasoning: '', refusal: null, toolCalls: new Map(), logprobs: null }
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
      this.applyDelta(frame)
    } else if (frame.type === FRAME.done) {
      this.finish()
      const result = {
        usage: frame.usage ?? null,
        finish_reason: frame.finish_reason ?? null,
        cost_usd: frame.cost_usd ?? null,
        text: this.answer.text,
        reasoning: this.answer.reasoning,
        refusal: this.answer.refusal,
        toolCalls: this.assembledToolCalls(),
      }
      if (frame.completion_id != null) result.completion_id = frame.completion_id
      if (frame.system_fingerprint != null) result.system_fingerprint = frame.system_fingerprint
      if (frame.usage_estimated != null) result.usage_estimated = frame.usage_estimated
      if (frame.model != null) result.model = frame.model
      if (this.answer.logprobs) result.logprobs = this.answer.logprobs
      this.resolveResult(result)
    } else if (frame.type === FRAME.error) {
      this.fail(MuxError.fromFrame({ ...frame, id: this.id }))
    }
  }

  /**
   * One `delta` in sequence: its parts in the documented order (reasoning, refusal, text, tool
   * calls), each added to the answer and queued for the reader.
   * @param {any} frame
   */
  applyDelta (frame) {
    const logprobs = frame.logprobs && typeof frame.logprobs === 'object' ? frame.logprobs : null
    if (logprobs) this.addLogprobs(logprobs)
    const text = typeof frame.text === 'string' ? frame.text : ''
    if (typeof frame.reasoning === 'string' && frame.reasoning) {
      this.answer.reasoning += frame.reasoning
      this.emit({ type: PART.reasoning, text: frame.reasoning })
    }
    if (typeof frame.refusal === 'string' && frame.refusal) {
      this.answer.refusal = (this.answer.refusal ?? '') + frame.refusal
      // the delta's logprobs go on the part they score: its text, else its refusal
      this.emit(withLogprobs({ type: PART.refusal, text: frame.refusal }, !text && logprobs))
    }
    if (text) {
      this.answer.text += text
      this.emit(withLogprobs({ type: PART.text, text }, logprobs))
    }
    if (Array.isArray(frame.tool_calls)) {
      for (const fragment of frame.tool_calls) {
        if (fragment && typeof fragment === 'object') this.emit(this.mergeToolCall(fragment))
      }
    }
  }

  /**
   * Adds one tool-call fragment to the call at its `index`, as OpenAI's own SDK does: `id`,
   * `type` and `name` are set by the fragment that carries them, `arguments` pieces append.
   * An upstream that omits `index` (some OpenAI-compatible ones send each call whole) gets
   * one call per new `id`; a fragment with neither continues the last call.
   * @param {any} fragment
   * @returns {{type: 'tool_call', index: number, id?: string, name?: string, arguments: string}}
   */
  mergeToolCall (fragment) {
    const fn = fragment.function && typeof fragment.function === 'object' ? fragment.function : {}
    const calls = this.answer.toolCalls
    let index = fragment.index
    if (!Number.isInteger(index)) {
      const last = calls.size === 0 ? -1 : Math.max(...calls.keys())
      const known = fragment.id == null ? undefined : [...calls].find(([, c]) => c.id === fragment.id)
      if (known) index = known[0]
      else if (fragment.id == null && last >= 0) index = last
      else index = last + 1
    }
    let call = calls.get(index)
    if (!call) {
      call = { function: { name: '', arguments: '' } }
      calls.set(index, call)
    }
    const part = { type: PART.toolCall, index }
    if (typeof fragment.id === 'string') part.id = call.id = fragment.id
    if (typeof fragment.type === 'string') call.type = fragment.type
    if (typeof fn.name === 'string' && fn.name) part.name = call.function.name = fn.name
    part.arguments = typeof fn.arguments === 'string' ? fn.arguments : ''
    call.function.arguments += part.arguments
    return part
  }

  /** The tool calls so far, in `index` order, in the shape of a chat-completions message. */
  assembledToolCalls () {
    return [...this.answer.toolCalls].sort((a, b) => a[0] - b[0]).map(([, c]) => ({
      id: c.id ?? '',
      type: c.type ?? 'function',
      function: { name: c.function.name, arguments: c.function.arguments },
    }))
  }

  /** @param {{content?: unknown, refusal?: unknown}} logprobs */
  addLogprobs (logprobs) {
    this.answer.logprobs ??= {}
    for (const key of ['content', 'refusal']) {
      if (Array.isArray(logprobs[key])) (this.answer.logprobs[key] ??= []).push(...logprobs[key])
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

  /** @param {{type: string, text?: string}} part */
  emit (part) {
    const waiter = this.waiters[0]
    if (!waiter) {
      this.queue.push(part)
      return
    }
    // A text reader waiting: a part without text is read (and skipped) by it, as it would
    // be from the queue.
    if (!waiter.parts && part.type !== PART.text) return
    this.waiters.shift()
    waiter.resolve({ value: waiter.parts ? part : part.text, done: false })
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
    const failure = this.failure
    this.failure = null
    waiters.forEach((w, i) => {
      if (failure && i === 0) w.reject(failure)
      else w.resolve({ value: undefined, done: true })
    })
  }

  changed () {
    this.onChange?.(this)
  }

  /**
   * The next value for a reader: a part (`parts`), or the next text.
   * @param {boolean} parts
   * @returns {Promise<IteratorResult<any>>}
   */
  take (parts) {
    while (this.queue.length > 0) {
      const part = this.queue.shift()
      if (parts) return Promise.resolve({ value: part, done: false })
      if (part.type === PART.text) return Promise.resolve({ value: part.text, done: false })
    }
    if (this.ended) {
      const failure = this.failure
      if (failure) {
        this.failure = null
        return Promise.reject(failure)
      }
      return Promise.resolve({ value: undefined, done: true })
    }
    return new Promise((resolve, reject) => this.waiters.push({ parts, resolve, reject }))
  }

  /** @param {boolean} parts @returns {AsyncIterableIterator<any>} */
  reader (parts) {
    const it = {
      next: () => this.take(parts),
      // `break` out of `for await`: the reader wants no more, so stop paying for it.
      return: () => {
        this.cancel()
        return Promise.resolve({ value: undefined, done: true })
      },
      [Symbol.asyncIterator]: () => it,
    }
    return it
  }

  /**
   * Everything the answer streams, part by part: `{type: 'reasoning'|'refusal'|'text', text}`
   * and `{type: 'tool_call', index, id?, name?, arguments}` (one per fragment; `id` and
   * `name` on a call's first fragment). Reading it consumes the stream, like the text
   * iterator: use one or the other. `break` cancels the stream.
   * @returns {AsyncIterableIterator<object>}
   */
  parts () {
    return this.reader(true)
  }

  /** Text only: parts without text yield nothing. @returns {AsyncIterator<string>} */
  [Symbol.asyncIterator] () {
    return this.reader(false)
  }
}

/**
 * @template {object} P
 * @param {P} part @param {object|null|false} logprobs
 * @returns {P}
 */
function withLogprobs (part, logprobs) {
  if (logprobs) part.logprobs = logprobs
  return part
}
