import { DEFAULTS } from './constants.js'

/**
 * Delay before reconnect attempt number `tries` (1-based): exponential, capped, with
 * "equal jitter" — half of it fixed, half random — so a fleet of clients that lost the same
 * gateway spreads out, yet each one still backs off.
 *
 * @example
 * backoffDelay(1) // 125..250
 * backoffDelay(3) // 500..1000
 * backoffDelay(99) // 2500..5000 (capped)
 *
 * @param {number} tries
 * @param {{baseMs?: number, maxMs?: number}} [opts]
 * @param {() => number} [random] uniform in [0, 1)
 * @returns {number}
 */
export function backoffDelay (tries, { baseMs = DEFAULTS.backoffBaseMs, maxMs = DEFAULTS.backoffMaxMs } = {}, random = Math.random) {
  const n = Math.max(1, Math.floor(tries))
  // 2 ** 30 already exceeds any sane cap; clamping the exponent keeps the math finite.
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(n - 1, 30))
  return Math.round(ceiling / 2 + random() * ceiling / 2)
}

/**
 * Calls `callback` after a delay that `timerCalc(tries)` computes, counting attempts until
 * `reset()`. The reconnect timer of the socket.
 *
 * @example
 * const retry = new Timer(() => socket.connect(), tries => backoffDelay(tries))
 * retry.scheduleTimeout() // after ~250 ms
 * retry.scheduleTimeout() // after ~500 ms
 * retry.reset()           // a connection worked: start over
 */
export default class Timer {
  /**
   * @param {() => void} callback
   * @param {(tries: number) => number} timerCalc
   */
  constructor (callback, timerCalc) {
    this.callback = callback
    this.timerCalc = timerCalc
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined
    /** Attempts made since the last `reset()`. */
    this.tries = 0
  }

  reset () {
    this.tries = 0
    clearTimeout(this.timer)
    this.timer = undefined
  }

  /** Whether an attempt is scheduled. */
  get pending () {
    return this.timer !== undefined
  }

  /**
   * Schedules the next attempt, replacing any scheduled one.
   * @param {number} [delayMs] overrides the computed delay (e.g. a server's `reconnect_after_ms`)
   * @returns {number} the delay used
   */
  scheduleTimeout (delayMs) {
    clearTimeout(this.timer)
    const delay = delayMs ?? this.timerCalc(this.tries + 1)
    this.timer = setTimeout(() => {
      this.timer = undefined
      this.tries = this.tries + 1
      this.callback()
    }, delay)
    return delay
  }

  /** Runs the scheduled attempt now (the page came back online or into view). */
  fireNow () {
    if (this.timer === undefined) return
    clearTimeout(this.timer)
    this.timer = undefined
    this.tries = this.tries + 1
    this.callback()
  }

  cancel () {
    clearTimeout(this.timer)
    this.timer = undefined
  }
}
