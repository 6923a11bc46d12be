// The anvil.v1 contract as Node sees it: the committed .proto files, loaded at run time.
//
// proto-loader reads protos/anvil/v1/*.proto directly, so this client can never drift from the
// contract the Python servers are generated from: there is no second copy of the schema to update.
// Field names keep their proto spelling (snake_case), int64 fields arrive as JS numbers (weight
// versions and steps stay far below 2^53), and enums arrive as their names ("STOP_REASON_STOP").

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The repository's protos/ folder (clients/node/src -> ../../../protos); ANVIL_PROTO_ROOT overrides it. */
export const DEFAULT_PROTO_ROOT = path.resolve(here, '..', '..', '..', 'protos');

const PROTO_FILES = ['anvil/v1/common.proto', 'anvil/v1/learner.proto', 'anvil/v1/rollout.proto'];

const LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
};

/** Load package anvil.v1 and return its namespace: `.LearnerService`, `.RolloutService`, message types. */
export function loadAnvilV1(protoRoot = process.env.ANVIL_PROTO_ROOT || DEFAULT_PROTO_ROOT) {
  const definition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
  return grpc.loadPackageDefinition(definition).anvil.v1;
}
