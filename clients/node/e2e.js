#!/usr/bin/env node
// Drives Headway from Node.js with nothing but the .proto files of protos/headway/v1:
// fork a base -> sample (token ids + logprobs) -> Step (importance_sampling) -> sample the
// new head.
//
//   node e2e.js <gateway host:port> <base slug> <fork name>
//
// The gateway's auth mode is honoured through HEADWAY_API_KEY: when set, every call carries
// `authorization: Bearer <key>`; unset = local mode (no key).
//
// On success prints one JSON line describing what it saw and exits 0; on any failure prints
// the error to stderr and exits 1.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const MAX_MESSAGE = 256 * 1024 * 1024; // the servers' limit (common.proto, "Transport")
const DEADLINE_MS = 120 * 1000;

// ---------------------------------------------------------------------- loading the contract
function loadContract() {
  const dir = path.join(PROTOS, 'headway', 'v1');
  // Relative names + includeDirs, so that `import "headway/v1/common.proto"` resolves to
  // the same file as the one we list (loaded once).
  const files = fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.proto'))
    .sort()
    .map((f) => `headway/v1/${f}`);
  const definition = protoLoader.loadSync(files, {
    includeDirs: [PROTOS],
    keepCase: true, // field names exactly as in the .proto files (snake_case)
    longs: String, // int64 fields (Tensor.shape, steps, seeds) arrive as decimal strings
    enums: String, // enums arrive as their names ('DTYPE_INT32', 'STOP_REASON_LENGTH')
    defaults: true, // unset scalars arrive as their zero values
    oneofs: true, // plus a virtual field naming the member set ('prompt': 'prompt_tokens')
  });
  return grpc.loadPackageDefinition(definition).headway.v1;
}

// ------------------------------------------------------------------------------- tensors
// Tensor = packed little-endian bytes + dtype + shape (common.proto). Writing uses Buffer's
// explicit-endian writers; reading uses a DataView over the received bytes, because the
// Buffer grpc-js hands us is a slice of a larger message buffer whose byteOffset need not
// be a multiple of 4 (so `new Int32Array(buf.buffer, buf.byteOffset, n)` may throw), and
// typed arrays use the host's byte order anyway.
const ITEMSIZE = {
  DTYPE_FLOAT32: 4,
  DTYPE_FLOAT64: 8,
  DTYPE_FLOAT16: 2,
  DTYPE_BFLOAT16: 2,
  DTYPE_INT32: 4,
  DTYPE_INT64: 8,
  DTYPE_BOOL: 1,
};

function int32Tensor(values) {
  const data = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => data.writeInt32LE(v, 4 * i));
  return { data, dtype: 'DTYPE_INT32', shape: [values.length] };
}

function float32Tensor(values) {
  const data = Buffer.alloc(4 * values.length);
  values.forEach((v, i) => data.writeFloatLE(v, 4 * i));
  return { data, dtype: 'DTYPE_FLOAT32', shape: [values.length] };
}

// A 1-D Tensor as a JS array of numbers, checking dtype, shape and byte length.
function readVector(tensor, what) {
  if (!tensor) throw new Error(`${what}: tensor is absent`);
  const shape = tensor.shape.map(Number); // int64 -> string (longs: String) -> number
  if (shape.length !== 1) throw new Error(`${what}: expected a 1-D tensor, shape [${shape}]`);
  const n = shape[0];
  const size = ITEMSIZE[tensor.dtype];
  if (!size) throw new Error(`${what}: unexpected dtype ${tensor.dtype}`);
  const data = tensor.data;
  if (data.length !== n * size) {
    throw new Error(`${what}: ${data.length} bytes for shape [${n}] of ${tensor.dtype}`);
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const read = {
    DTYPE_INT32: (i) => view.getInt32(4 * i, true),
    DTYPE_INT64: (i) => Number(view.getBigInt64(8 * i, true)),
    DTYPE_FLOAT32: (i) => view.getFloat32(4 * i, true),
    DTYPE_FLOAT64: (i) => view.getFloat64(8 * i, true),
  }[tensor.dtype];
  if (!read) throw new Error(`${what}: cannot read dtype ${tensor.dtype}`);
  return Array.from({ length: n }, (_, i) => read(i));
}

// ------------------------------------------------------------------------------ calls
function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.HEADWAY_API_KEY) md.set('authorization', `Bearer ${process.env.HEADWAY_API_KEY}`);
  return md;
}

// A unary call as a promise; the error names the RPC and the gRPC status.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, metadata(), { deadline }, (err, reply) => {
      if (!err) return resolve(reply);
      const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
      reject(new Error(`${method} failed: ${code}: ${err.details || err.message}`));
    });
  });
}

// Sampled sequences decoded and checked: tokens, logprobs, one logprob per token, <= 0.
function decodeSample(reply, n, label) {
  check(reply.sequences.length === n, `${label}: ${reply.sequences.length} sequences, want ${n}`);
  check(reply.checkpoint, `${label}: reply has no checkpoint`);
  return reply.sequences.map((seq, k) => {
    const tokens = readVector(seq.tokens, `${label}.sequences[${k}].tokens`);
    const logprobs = readVector(seq.logprobs, `${label}.sequences[${k}].logprobs`);
    check(seq.tokens.dtype === 'DTYPE_INT32', `${label}[${k}] tokens dtype ${seq.tokens.dtype}`);
    check(seq.logprobs.dtype === 'DTYPE_FLOAT32', `${label}[${k}] logprobs ${seq.logprobs.dtype}`);
    check(tokens.length >= 1, `${label}[${k}]: no tokens`);
    check(
      logprobs.length === tokens.length,
      `${label}[${k}]: ${logprobs.length} logprobs for ${tokens.length} tokens`
    );
    logprobs.forEach((lp, i) =>
      check(Number.isFinite(lp) && lp <= 0, `${label}[${k}].logprobs[${i}] = ${lp}`)
    );
    return { tokens, logprobs, stop_reason: seq.stop_reason, text: seq.text };
  });
}

// A Datum (common.proto) from a prompt and one sampled completion, aligned for next-token
// prediction: S = prompt + completion, input = S[0..L-2], target = S[1..L-1]; position i
// is a completion position when target i is a completion token (i >= P - 1).
function datumOf(prompt, seq, advantage) {
  const S = prompt.concat(seq.tokens);
  const N = S.length - 1;
  const P = prompt.length;
  const completion = (i) => i >= P - 1;
  return {
    datum: {
      input_tokens: int32Tensor(S.slice(0, N)),
      target_tokens: int32Tensor(S.slice(1)),
      weights: float32Tensor(Array.from({ length: N }, (_, i) => (completion(i) ? 1 : 0))),
      sampling_logprobs: float32Tensor(
        Array.from({ length: N }, (_, i) => (completion(i) ? seq.logprobs[i - (P - 1)] : 0))
      ),
      advantages: float32Tensor(
        Array.from({ length: N }, (_, i) => (completion(i) ? advantage : 0))
      ),
      reward: advantage,
    },
  };
}

// -------------------------------------------------------------------------------- main
async function main(argv) {
  const [address, base, fork] = argv.slice(2);
  if (!address || !base || !fork) {
    throw new Error('usage: node e2e.js <gateway host:port> <base slug> <fork name>');
  }
  const v1 = loadContract();
  const credentials = grpc.credentials.createInsecure();
  const options = {
    'grpc.max_send_message_length': MAX_MESSAGE,
    'grpc.max_receive_message_length': MAX_MESSAGE,
  };
  const models = new v1.ModelService(address, credentials, options);
  const sampling = new v1.SamplingService(address, credentials, options);
  const training = new v1.TrainingService(address, credentials, options);
  try {
    // 1. Fork: a LoRA fork of the base (the `mode` oneof is chosen by setting `lora`).
    const model = await call(models, 'ForkModel', { source: base, name: fork, lora: { rank: 8 } });
    check(model.slug === fork, `fork slug ${model.slug}`);
    check(model.trainable && !model.is_base, 'the fork is not trainable');
    check(model.lora && model.lora.rank === 8, `fork LoRA rank ${JSON.stringify(model.lora)}`);
    check(Number(model.head_step) === 0, `fresh fork head_step ${model.head_step}`);
    const vocab = model.vocab_size;

    // 2. Sample the fork (its step-0 head): token ids + per-token logprobs.
    const prompt = [5, 17, 42, 63, 11].filter((t) => t < vocab);
    const params = { max_tokens: 8, n: 2, temperature: 1, seed: 7 };
    const first = await call(sampling, 'Sample', {
      model: fork,
      prompt_tokens: int32Tensor(prompt), // member of the `prompt` oneof
      params,
    });
    const seqs = decodeSample(first, 2, 'sample 1');
    const echoed = readVector(first.prompt_tokens, 'sample 1.prompt_tokens');
    check(JSON.stringify(echoed) === JSON.stringify(prompt), `prompt echoed as ${echoed}`);
    check(first.model === fork, `sample 1 model ${first.model}`);
    check(
      first.checkpoint === model.head_checkpoint,
      `sample 1 served by ${first.checkpoint}, the fork's head is ${model.head_checkpoint}`
    );

    // 3. Step: importance_sampling on the two sequences, +1 / -1 advantages.
    const step = await call(training, 'Step', {
      model: fork,
      data: [datumOf(prompt, seqs[0], 1), datumOf(prompt, seqs[1], -1)],
      loss_fn: 'importance_sampling',
      adam: { learning_rate: 1e-2 },
    });
    const trained = seqs[0].tokens.length + seqs[1].tokens.length;
    const fb = step.forward_backward;
    const opt = step.optim_step;
    check(fb.num_datums === 2, `forward_backward.num_datums ${fb.num_datums}`);
    check(Number(fb.num_tokens) === trained, `num_tokens ${fb.num_tokens}, want ${trained}`);
    check(Number(opt.step) === 1, `optim_step.step ${opt.step}`);
    check(opt.checkpoint && opt.checkpoint !== first.checkpoint, `new head ${opt.checkpoint}`);
    check(opt.checkpoint_info && opt.checkpoint_info.is_head, 'checkpoint_info is not the head');
    check(opt.checkpoint_info.parent_id === first.checkpoint, 'new head has the wrong parent');

    // 4. Sample again, unpinned: served by the new head (read-your-writes).
    const second = await call(sampling, 'Sample', {
      model: fork,
      prompt_tokens: int32Tensor(prompt),
      params,
    });
    const seqs2 = decodeSample(second, 2, 'sample 2');
    check(
      second.checkpoint === opt.checkpoint,
      `sample 2 served by ${second.checkpoint}, the step made ${opt.checkpoint}`
    );

    return {
      ok: true,
      model: fork,
      base,
      node: process.version,
      grpc_js: require('@grpc/grpc-js/package.json').version,
      proto_loader: require('@grpc/proto-loader/package.json').version,
      fork_checkpoint: model.head_checkpoint,
      first_checkpoint: first.checkpoint,
      step: Number(opt.step),
      step_checkpoint: opt.checkpoint,
      second_checkpoint: second.checkpoint,
      prompt_tokens: prompt.length,
      first_tokens: seqs.map((s) => s.tokens.length),
      first_logprobs: seqs.map((s) => s.logprobs.length),
      second_tokens: seqs2.map((s) => s.tokens.length),
      trained_tokens: Number(fb.num_tokens),
      loss: fb.metrics['loss:sum'],
    };
  } finally {
    models.close();
    sampling.close();
    training.close();
  }
}

main(process.argv).then(
  (report) => {
    process.stdout.write(JSON.stringify(report) + '\n');
    process.exit(0);
  },
  (err) => {
    // Our own errors say what failed; anything else (a bug here) gets its stack.
    const ours = err instanceof Error && err.constructor === Error;
    process.stderr.write(`e2e.js: ${ours ? err.message : (err && err.stack) || err}\n`);
    process.exit(1);
  }
);
