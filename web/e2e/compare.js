#!/usr/bin/env node
// Prints the 12-tab comparison: muxgate (one shared WebSocket) against plain per-tab SSE.
//   cd web && npm run compare            (MUXGATE_BIN, CHROMIUM_PATH and TABS may be set)
import { launchBrowser, startStack } from './harness.js'
import { measureMuxgate, measureSse, SHAPE } from './baseline.js'

const tabs = Number(process.env.TABS ?? 12)
const stack = await startStack()
const { context, close } = await launchBrowser()
try {
  const user = `compare-${process.pid}`
  const mux = await measureMuxgate(context, stack.gateway.url, user, tabs)
  const sockets = (await stack.gateway.admin(user)).connections_total
  const sse = await measureSse(context, stack.gateway.url, stack.mock.url, tabs)
  const secs = (SHAPE.chunks * SHAPE.delayMs + SHAPE.stallMs) / 1000
  console.log(`${tabs} tabs in one Chromium context, each streaming a ${SHAPE.chunks}-chunk answer (~${secs} s):`)
  console.log(`  muxgate    ${mux.maxConcurrent} of ${tabs} streaming at once, ${mux.exact}/${tabs} exact, over ${sockets} WebSocket`)
  console.log(`  plain SSE  ${sse.maxConcurrent} of ${tabs} streaming at once, ${sse.exact}/${tabs} exact, over HTTP/1.1 (6 per host)`)
} finally {
  await close()
  await stack.stop()
}
