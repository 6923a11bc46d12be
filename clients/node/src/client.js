// Promise-returning clients of Anvil's services, with the API key sent on every call.
//
// Anvil servers with auth on expect gRPC metadata `authorization: Bearer <key>` (health checks and
// reflection stay open). grpc-js will not attach call credentials to an insecure (plaintext) channel,
// so the key is added by a client interceptor instead: the same header, on every call, any channel.

import grpc from '@grpc/grpc-js';

/** Largest message either way; matches the servers' default cap (weight chunks and batches must fit). */
const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;

/** Seconds a call may take before it fails with DEADLINE_EXCEEDED, so a stuck server never hangs a script. */
const DEFAULT_DEADLINE_S = 300;

/** An interceptor that adds `authorization: Bearer <apiKey>` to the metadata of every call. */
export function bearerAuthInterceptor(apiKey) {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set('authorization', `Bearer ${apiKey}`);
        next(metadata, listener);
      },
    });
}

/**
 * Connect to one service (e.g. `anvil.LearnerService`) at `address` ("host:port").
 * Returns an object with one async function per unary RPC: `await learner.OptimStep({...})`.
 * A failed call rejects with grpc-js's error, whose `.code` is a `grpc.status` number and
 * `.details` is the server's message.
 */
export function connect(ServiceClient, address, { apiKey, deadlineS = DEFAULT_DEADLINE_S } = {}) {
  const options = {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  };
  if (apiKey) options.interceptors = [bearerAuthInterceptor(apiKey)];
  const client = new ServiceClient(address, grpc.credentials.createInsecure(), options);
  const calls = { close: () => client.close() };
  for (const [name, method] of Object.entries(ServiceClient.service)) {
    if (method.requestStream || method.responseStream) continue; // only unary RPCs are needed here
    calls[name] = (request) => unaryCall(client, name, request, deadlineS);
  }
  return calls;
}

function unaryCall(client, name, request, deadlineS) {
  const deadline = new Date(Date.now() + deadlineS * 1000);
  return new Promise((resolve, reject) => {
    client[name](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** The name of a grpc status code ("INVALID_ARGUMENT"), for messages and reports. */
export function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? `UNKNOWN_CODE_${code}`;
}

export { grpc };
