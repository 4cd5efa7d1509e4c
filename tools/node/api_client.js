#!/usr/bin/env node
// A client of qm.v1.TaskQueue in another language, built only from protos/ (no generated
// code, nothing from the Python package): @grpc/grpc-js with @grpc/proto-loader.
// tests/e2e/test_node_client.py runs it against a real qm-server and qm-worker.
//
//   node tools/node/api_client.js HOST:PORT QUEUE
//
// Submits the math task "1 + 2 * 5" to QUEUE, follows it on StreamTaskResults until the
// server ends the stream, reads it with GetTaskStatus, and submits a task of an unknown
// type. Prints what it saw as one JSON object on stdout; exits 1 (message on stderr) if a
// call it expects to succeed fails.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const CALL_TIMEOUT_MS = 30000;
const STREAM_TIMEOUT_MS = 90000;

function loadApi() {
  // google/protobuf/timestamp.proto resolves to the copy that ships with protobufjs.
  const definition = protoLoader.loadSync('qm/v1/task_queue.proto', {
    includeDirs: [PROTOS], keepCase: true, enums: String, longs: String, defaults: true,
  });
  return grpc.loadPackageDefinition(definition).qm.v1;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(CALL_TIMEOUT_MS) }, (error, response) => {
      if (error) reject(error); else resolve(response);
    });
  });
}

// Every status the server sends for the task, until it ends the stream.
function follow(client, taskId) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const call = client.StreamTaskResults({ deadline: deadline(STREAM_TIMEOUT_MS) });
    call.on('data', (response) => seen.push(response.status));
    call.on('error', reject);
    call.on('end', () => resolve(seen));
    call.write({ task_ids: [taskId] });
    call.end(); // half-close: the server ends the stream once the task is terminal
  });
}

// The fields a user looks at, with the result as text and times as ISO strings.
function summary(status) {
  const time = (ts) => (ts ? new Date(Number(ts.seconds) * 1000 + ts.nanos / 1e6).toISOString() : null);
  return {
    task_id: status.task_id, state: status.state, attempts: status.attempts,
    result: status.result.toString('utf8'), codec: status.codec, error: status.error,
    created_at: time(status.created_at), finished_at: time(status.finished_at),
  };
}

function errorSummary(error) {
  return { code: error.code, code_name: grpc.status[error.code], details: error.details };
}

async function main([address, queue]) {
  if (!address || !queue) throw new Error('usage: api_client.js HOST:PORT QUEUE');
  const api = loadApi();
  const client = new api.TaskQueue(address, grpc.credentials.createInsecure());
  try {
    const submitted = await unary(client, 'SubmitTask', {
      type: 'math', payload: Buffer.from('1 + 2 * 5', 'utf8'), queue,
    });
    const stream = (await follow(client, submitted.task_id)).map(summary);
    const status = summary((await unary(client, 'GetTaskStatus', { task_id: submitted.task_id })).status);
    let unknownType = null;
    try {
      const accepted = await unary(client, 'SubmitTask', {
        type: 'no.such.type', payload: Buffer.from('1', 'utf8'), queue,
      });
      unknownType = { accepted_as: accepted.task_id };
    } catch (error) {
      unknownType = errorSummary(error);
    }
    return {
      submitted: { task_id: submitted.task_id, state: submitted.state }, stream, status, unknown_type: unknownType,
    };
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  (seen) => { process.stdout.write(JSON.stringify(seen) + '\n'); },
  (error) => {
    const code = error.code !== undefined ? ` (${grpc.status[error.code]})` : '';
    process.stderr.write(`api_client.js: ${error.message}${code}\n`);
    process.exitCode = 1;
  },
);
