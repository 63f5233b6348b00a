#!/usr/bin/env node
// A tool-calling exchange over muxgate's WebSocket protocol, as an app would run it: ask with
// `tools`, merge the streamed tool-call fragments, run the tool, send its result back, print
// the answer. Against the dev-mode gateway (`cargo run`), whose simulated provider calls the
// tool on its own (see "Automatic tool use" in src/mock/mod.rs).
//
//   cargo run                                   # in one terminal: dev mode on 127.0.0.1:8080
//   node scripts/tool-call-demo.mjs             # Node 22+; on Node 20 add --experimental-websocket
//
// MUXGATE_URL (default http://127.0.0.1:8080) points it elsewhere; dev mode only (/dev/token).

const base = process.env.MUXGATE_URL ?? 'http://127.0.0.1:8080'
const model = process.env.MUXGATE_MODEL ?? 'deepseek-v3.2'

if (typeof WebSocket !== 'function') {
  console.error('this Node has no WebSocket: use Node 22+, or Node 20 with --experimental-websocket')
  process.exit(2)
}

const tools = [{
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}]

/** The tool itself: a stand-in for a real weather service. */
function getWeather ({ city }) {
  return JSON.stringify({ city, temperature_c: 21, sky: 'sunny' })
}

const { token } = await (await fetch(`${base}/dev/token?user=tool-demo&tier=pro`)).json()
const ws = new WebSocket(`${base.replace(/^http/, 'ws')}/v1/ws`, 'muxgate.v1')
const frames = []
let wake = null
ws.onmessage = (e) => { frames.push(JSON.parse(e.data)); wake?.() }
ws.onerror = () => { console.error(`cannot reach ${base}: is \`cargo run\` running?`); process.exit(1) }
await new Promise((resolve) => { ws.onopen = resolve })

/** The next frame from the gateway. */
async function next () {
  while (frames.length === 0) await new Promise((resolve) => { wake = resolve })
  return frames.shift()
}

/** Opens stream `id`, prints its frames, and returns its text, merged tool calls and end. */
async function ask (id, messages) {
  ws.send(JSON.stringify({ type: 'open', id, model, messages, params: { tools, tool_choice: 'auto' } }))
  let text = ''
  const calls = []
  for (;;) {
    const f = await next()
    if (f.id !== id) continue
    console.log('  <-', JSON.stringify(f))
    if (f.type === 'delta') {
      text += f.text
      for (const frag of f.tool_calls ?? []) {
        const call = (calls[frag.index] ??= { id: '', type: 'function', function: { name: '', arguments: '' } })
        if (frag.id) call.id = frag.id
        if (frag.function?.name) call.function.name += frag.function.name
        if (frag.function?.arguments) call.function.arguments += frag.function.arguments
      }
    } else if (f.type === 'done' || f.type === 'error') {
      return { text, calls, end: f }
    }
  }
}

ws.send(JSON.stringify({ type: 'hello', token, client: 'tool-call-demo' }))
const welcome = await next()
if (welcome.type !== 'welcome') throw new Error(`no welcome: ${JSON.stringify(welcome)}`)

const messages = [{ role: 'user', content: 'What is the weather in Paris?' }]
console.log('1. ask, offering the get_weather tool')
const first = await ask('ask', messages)
if (first.end.type !== 'done') throw new Error(`failed: ${first.end.message}`)
console.log(`   finish_reason=${first.end.finish_reason}; merged calls:`, JSON.stringify(first.calls))

messages.push({ role: 'assistant', content: first.text || null, tool_calls: first.calls })
for (const call of first.calls) {
  const result = getWeather(JSON.parse(call.function.arguments))
  console.log(`2. run ${call.function.name}(${call.function.arguments}) -> ${result}`)
  messages.push({ role: 'tool', tool_call_id: call.id, content: result })
}

console.log('3. send the result back')
const answer = await ask('answer', messages)
console.log(`   answer (${answer.end.finish_reason}): ${answer.text}`)
ws.close()
