// The demo chat: a real page on the shim. Its token comes from the gateway's dev mode
// (`/dev/token`), or from `?token=` (then `?user=` is ignored). `?user=` picks the demo user,
// `?tier=` the tier, `?model=` the preselected model, `?ws=` another gateway's socket URL.
import { connect } from '../src/index.js'

const params = new URLSearchParams(location.search)
const user = params.get('user') || 'demo'
const tier = params.get('tier') || 'pro'
const fixedToken = params.get('token')

const $ = (id) => document.getElementById(id)
const el = {
  conversation: $('conversation'), empty: $('empty'), banner: $('banner'),
  form: $('composer'), prompt: $('prompt'), model: $('model'), send: $('send'), stop: $('stop'), hint: $('hint'),
  role: $('role'), chipRole: $('chip-role'), connection: $('connection'), chipConn: $('chip-conn'),
  tabs: $('tabs'), user: $('user'), tabId: $('tab-id'),
}

function banner (text, kind = 'warn') {
  el.banner.hidden = !text
  el.banner.textContent = text || ''
  el.banner.dataset.kind = kind
}

async function devToken () {
  let res
  try {
    res = await fetch(`/dev/token?user=${encodeURIComponent(user)}&tier=${encodeURIComponent(tier)}`)
  } catch (err) {
    banner('Cannot reach the gateway for a demo token; retrying…')
    throw err
  }
  if (!res.ok) {
    banner('No demo token: this gateway is not in dev mode. Open the page with ?token=<a JWT for this gateway>.', 'error')
    throw new Error(`/dev/token answered ${res.status}`)
  }
  banner('')
  return (await res.json()).token
}

const mux = connect({ url: params.get('ws') || '/v1/ws', token: fixedToken || devToken })
// for the browser tests and the curious: the page's one handle on the shared socket
window.muxgateDemo = { mux }

if (params.get('model')) {
  const wanted = params.get('model')
  if (![...el.model.options].some(o => o.value === wanted)) el.model.add(new Option(wanted))
  el.model.value = wanted
}

/** @type {Array<{role: string, content: string}>} */
const history = []
let current = null

mux.on('status', (s) => {
  el.role.textContent = s.role
  el.chipRole.dataset.state = s.role
  el.connection.textContent = s.connection
  el.chipConn.dataset.state = s.connection
  el.tabs.textContent = String(s.tabs)
  el.user.textContent = s.user ? `${s.user} · ${s.tier}` : '–'
  el.tabId.textContent = s.tabId
  if (current && current.stream) {
    const q = s.queue.find(x => x.id === current.stream.id)
    current.setQueued(q ? q.position : null)
  }
})
mux.on('error', (err) => banner(`Gateway: ${err.message} (${err.code})`, 'error'))

function addMessage (role, text) {
  el.empty.hidden = true
  const wrap = document.createElement('div')
  wrap.className = `msg ${role}`
  const bubble = document.createElement('div')
  bubble.className = 'bubble'
  bubble.textContent = text
  const meta = document.createElement('div')
  meta.className = 'meta'
  wrap.append(bubble, meta)
  el.conversation.append(wrap)
  wrap.scrollIntoView({ block: 'end' })
  return { wrap, bubble, meta }
}

function metaItem (meta, text, cls) {
  const span = document.createElement('span')
  span.textContent = text
  if (cls) span.className = cls
  meta.append(span)
}

function setBusy (busy) {
  el.send.disabled = busy
  el.stop.hidden = !busy
  el.hint.textContent = busy ? 'streaming…' : ''
}

async function ask (content) {
  const model = el.model.value
  history.push({ role: 'user', content })
  addMessage('user', content)
  const view = addMessage('assistant', 'waiting for the model…')
  view.wrap.classList.add('waiting')
  const stream = mux.chat({ model, messages: history.slice() })
  const started = performance.now()
  let text = ''
  current = {
    stream,
    setQueued (position) {
      if (position !== null && text === '') view.bubble.textContent = `queued for an upstream slot: #${position}`
    },
  }
  setBusy(true)
  try {
    for await (const delta of stream) {
      if (text === '') {
        view.wrap.classList.remove('waiting')
        view.wrap.classList.add('streaming')
      }
      text += delta
      view.bubble.textContent = text
      view.wrap.scrollIntoView({ block: 'end' })
    }
    view.wrap.classList.remove('streaming', 'waiting')
    try {
      const { usage, finish_reason: finish, cost_usd: cost } = await stream.result
      metaItem(view.meta, model)
      if (finish) metaItem(view.meta, finish)
      if (usage) metaItem(view.meta, `${usage.prompt_tokens} in · ${usage.completion_tokens} out`)
      if (typeof cost === 'number') metaItem(view.meta, `$${cost.toFixed(6)}`)
      metaItem(view.meta, `${((performance.now() - started) / 1000).toFixed(1)} s`)
    } catch (err) {
      if (err.code !== 'cancelled') throw err
      if (text === '') view.bubble.textContent = '(stopped before the first token)'
      metaItem(view.meta, 'stopped', 'stopped')
    }
  } catch (err) {
    view.wrap.classList.remove('streaming', 'waiting')
    if (text === '') view.bubble.textContent = '(no answer)'
    metaItem(view.meta, `${err.code}: ${err.message}`, 'err')
  } finally {
    if (text) history.push({ role: 'assistant', content: text })
    current = null
    setBusy(false)
    el.prompt.focus()
  }
}

el.form.addEventListener('submit', (event) => {
  event.preventDefault()
  const content = el.prompt.value.trim()
  if (!content || current) return
  el.prompt.value = ''
  autosize()
  ask(content)
})
el.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault()
    el.form.requestSubmit()
  }
})
function autosize () {
  el.prompt.style.height = 'auto'
  el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 200)}px`
}
el.prompt.addEventListener('input', autosize)
el.stop.addEventListener('click', () => current?.stream.cancel())
$('open-tab').addEventListener('click', () => window.open(location.href, '_blank', 'noopener'))
$('example').addEventListener('click', () => {
  el.prompt.value = 'Explain in a few sentences why a browser stalls the 7th SSE stream to one host, and how one shared WebSocket avoids it.'
  autosize()
  el.prompt.focus()
})
el.prompt.focus()
