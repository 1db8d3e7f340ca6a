// aedes 2 (MQTT 5) on one loopback port, for edgeship's tests and scripts/cluster-check.
// Alone: in-memory persistence. With --redis-port: mqemitter-redis + aedes-persistence-redis,
// so several of these processes form one cluster. With --password-file: clients must log
// in as --user with the file's first line as password. With --hang-subscribe PREFIX, a
// SUBSCRIBE to a filter starting with PREFIX is never answered (what aedes-persistence-redis
// does to a persistent session's multi-filter SUBSCRIBE), for the SUBACK-timeout tests.
import { createServer } from 'node:net'
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { Aedes } from 'aedes'

const { values: opt } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string', default: '127.0.0.1' },
    id: { type: 'string', default: 'aedes' },
    'redis-port': { type: 'string' },
    user: { type: 'string' },
    'password-file': { type: 'string' },
    'max-packet-bytes': { type: 'string', default: '4194304' },
    'hang-subscribe': { type: 'string' }
  }
})

async function clusterParts () {
  if (!opt['redis-port']) return {}
  const port = Number(opt['redis-port'])
  const mq = (await import('mqemitter-redis')).default({ port, host: '127.0.0.1' })
  const persistence = (await import('aedes-persistence-redis')).default({ port, host: '127.0.0.1' })
  return { mq, persistence }
}

function authenticate () {
  if (!opt['password-file']) return undefined
  const password = readFileSync(opt['password-file'], 'utf8').split('\n')[0]
  return (client, username, given, done) => {
    const ok = username === opt.user && given !== undefined && given.toString() === password
    if (ok) return done(null, true)
    const err = new Error('bad user name or password')
    err.returnCode = 4
    done(err, false)
  }
}

const broker = await Aedes.createBroker({
  id: opt.id,
  maximumPacketSize: Number(opt['max-packet-bytes']),
  ...(await clusterParts())
})
const auth = authenticate()
if (auth) broker.authenticate = auth
const hang = opt['hang-subscribe']
if (hang) {
  broker.authorizeSubscribe = (client, sub, done) => {
    if (!sub.topic.startsWith(hang)) done(null, sub)
  }
}
broker.on('clientError', (client, err) => {
  console.error(`client error ${client && client.id}: ${err.message}`)
})
const server = createServer(broker.handle)
// --port 0: the kernel picks a free port (no race with other processes); the line below
// says which, and the launcher reads it
server.listen(Number(opt.port), opt.host, () => {
  console.log(`aedes ${opt.id} listening on ${opt.host}:${server.address().port}`)
})
const stop = () => { server.close(); broker.close(() => process.exit(0)) }
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
