#!/usr/bin/env node
// An independent SPDY/3.1 client for crishim's streaming server, built on spdy-transport
// (the SPDY implementation behind node-spdy). It does what kubectl/kubelet do for exec,
// attach and port-forward: upgrade the HTTP/1.1 connection, open one SPDY stream per
// channel with a "streamtype" header, pump the data, and report what came back as JSON.
//
// Usage: node spdy_exec.js '<json config>'
//   exec/attach: {"url", "protocols": [..], "stdin": "text" | null, "stdout": true,
//                 "stderr": true, "tty": false, "resize": [[w, h], ..]}
//   port-forward: {"url", "portforward": [{"port": 7, "requestId": "0", "data": "text"}, ..]}
// Prints {"status": <HTTP status>, "protocol", "stdout", "stdoutLength", "stdoutSha256",
//         "stderr", "error"} or, for port-forward, {"status", "forwards": [{data, error}]}.
'use strict'

const net = require('net')
const crypto = require('crypto')
const transport = require('spdy-transport')

const config = JSON.parse(process.argv[2])
const url = new URL(config.url)
const protocols = config.protocols ||
  (config.portforward ? ['portforward.k8s.io'] : ['v4.channel.k8s.io'])

function fail (message) {
  process.stdout.write(JSON.stringify({ clientError: message }) + '\n')
  process.exit(2)
}

// Upgrade by hand over a plain socket, as Kubernetes' SPDY round tripper does.
function upgrade (callback) {
  const socket = net.connect(Number(url.port), url.hostname)
  socket.on('error', (err) => fail(String(err)))
  let head = Buffer.alloc(0)
  function onData (chunk) {
    head = Buffer.concat([head, chunk])
    const end = head.indexOf('\r\n\r\n')
    if (end < 0) return
    socket.removeListener('data', onData)
    socket.pause()
    const lines = head.subarray(0, end).toString('latin1').split('\r\n')
    const status = Number(lines[0].split(' ')[1])
    const headers = {}
    for (const line of lines.slice(1)) {
      const i = line.indexOf(':')
      headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim()
    }
    const rest = head.subarray(end + 4)
    if (rest.length) socket.unshift(rest)
    callback(socket, status, headers)
  }
  socket.on('data', onData)
  socket.write([
    `POST ${url.pathname}${url.search} HTTP/1.1`,
    `Host: ${url.host}`,
    'Connection: Upgrade',
    'Upgrade: SPDY/3.1',
    ...protocols.map((p) => `X-Stream-Protocol-Version: ${p}`),
    'Content-Length: 0',
    '', ''
  ].join('\r\n'))
}

function collect (stream, sink) {
  const hash = crypto.createHash('sha256')
  const kept = []
  let length = 0
  stream.on('data', (chunk) => {
    length += chunk.length
    hash.update(chunk)
    if (length <= 65536) kept.push(chunk)
  })
  return new Promise((resolve) => {
    stream.on('end', () => {
      sink.text = length <= 65536 ? Buffer.concat(kept).toString('utf8') : null
      sink.length = length
      sink.sha256 = hash.digest('hex')
      resolve()
    })
    stream.on('error', (e) => { if (process.env.CLIENT_DEBUG) console.error('stream error', stream.id, e); resolve() })
  })
}

function open (connection, headers) {
  return new Promise((resolve, reject) => {
    connection.request({ method: 'POST', path: url.pathname, headers }, (err, stream) => {
      if (err) reject(err)
      else resolve(stream)
    })
  })
}

async function remoteCommand (connection, result) {
  const waits = []
  const error = await open(connection, { streamtype: 'error' })
  error.end() // the client only reads the error stream
  const errorOut = {}
  waits.push(collect(error, errorOut))
  let stdin = null
  if (config.stdin !== null && config.stdin !== undefined) {
    stdin = await open(connection, { streamtype: 'stdin' })
    stdin.on('data', () => {})
  }
  const stdoutOut = {}
  if (config.stdout !== false) {
    const stdout = await open(connection, { streamtype: 'stdout' })
    stdout.end()
    waits.push(collect(stdout, stdoutOut))
  }
  const stderrOut = {}
  if (config.stderr !== false && !config.tty) {
    const stderr = await open(connection, { streamtype: 'stderr' })
    stderr.end()
    waits.push(collect(stderr, stderrOut))
  }
  let resize = null
  if (config.tty) {
    resize = await open(connection, { streamtype: 'resize' })
    resize.on('data', () => {})
    for (const [w, h] of config.resize || []) {
      resize.write(JSON.stringify({ Width: w, Height: h }))
    }
  }
  if (stdin) {
    stdin.end(Buffer.from(config.stdin, 'utf8'))
  }
  await Promise.all(waits)
  if (resize) resize.end()
  result.stdout = stdoutOut.text
  result.stdoutLength = stdoutOut.length
  result.stdoutSha256 = stdoutOut.sha256
  result.stderr = stderrOut.text
  result.error = errorOut.text
}

async function portForward (connection, result) {
  result.forwards = await Promise.all(config.portforward.map(async (forward) => {
    const headers = { port: String(forward.port), requestid: String(forward.requestId) }
    const error = await open(connection, { ...headers, streamtype: 'error' })
    error.end()
    const errorOut = {}
    const errorDone = collect(error, errorOut)
    const data = await open(connection, { ...headers, streamtype: 'data' })
    const dataOut = {}
    const dataDone = collect(data, dataOut)
    data.end(Buffer.from(forward.data, 'utf8'))
    await Promise.all([dataDone, errorDone])
    return { data: dataOut.text, error: errorOut.text }
  }))
}

upgrade((socket, status, headers) => {
  const result = { status, protocol: headers['x-stream-protocol-version'] || null }
  if (status !== 101) {
    process.stdout.write(JSON.stringify(result) + '\n')
    process.exit(0)
  }
  const connection = transport.connection.create(socket, { protocol: 'spdy', isServer: false })
  connection.start(3.1)
  connection.on('error', () => {})
  socket.resume()
  const work = config.portforward ? portForward : remoteCommand
  work(connection, result).then(() => {
    process.stdout.write(JSON.stringify(result) + '\n')
    socket.destroy()
    process.exit(0)
  }, (err) => fail(String(err && err.stack ? err.stack : err)))
})
