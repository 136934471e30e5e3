"""seqio Tasks and Mixtures for C4 with each of the suite's objectives.

T5X users get the suite's data the way they use ``c4_v220_span_corruption``::

    from repeat_scaling.data import seqio_tasks
    names = seqio_tasks.register_c4_tasks(vocab="byte", tfds_data_dir="gs://my-bucket/tfds")
    ds = seqio.get_mixture_or_task("repeat_scaling_c4_span_corruption").get_dataset(
        {"inputs": 512, "targets": 114}, split="train", seed=0)

Registered names (``prefix`` defaults to ``repeat_scaling_c4``):

- ``{prefix}_span_corruption``: T5's span corruption (noise density 0.15, mean span 3,
  sentinels counting down from the end of the vocabulary), the same pipeline as
  ``c4_v220_span_corruption``: random chunk, concatenate, split into segments that corrupt
  to exactly ``inputs`` tokens, denoise, EOS.
- ``{prefix}_prefix_lm``: T5's prefix LM: segments of ``inputs`` length split at a uniform
  random point into inputs and targets.
- ``{prefix}_causal_lm``: ``targets`` only, concatenated and split into ``targets``-length
  segments (decoder-only LM, use with ``seqio.DecoderFeatureConverter``).
- ``{prefix}_ul2_{r1,r2,x1,x2,x3,x4,s}`` and the Mixture ``{prefix}_ul2``: UL2's mixture of
  denoisers (R: mean span 3 / 8 at 15%; X: 3 / 8 at 50%, 64 at 15% / 50%; S: prefix LM)
  with the native ``ul2`` objective's denoisers and rates
  (``ul2_denoisers.default_ul2_denoisers``: R 1/3, S 1/3, X 1/3), each input starting with
  the native mode token: ONE extra id per paradigm (``[NLU]`` R, ``[NLG]`` X, ``[S2S]``
  S; ``ul2_denoisers.mode_token_id``: the three lowest extra ids, 259/260/261 for the byte
  vocabulary), never the paradigm's text. Sentinels count down from the top and never
  reach them (more spans than ``extra_ids - 3`` is an error, as natively).

Where the two paths differ: their random draws (span segmentation, S split point,
denoiser choice) come from TF stateless ops keyed by seqio's seeds here and from Philox
keyed by (seed, slot) natively, and T5's chunking (random chunk, concatenate, split) is
not the store's repetition plan; the S task splits uniformly at random as T5's prefix LM,
the native S draws at most ``round(2 * target_fraction * L)`` targets. Given the same
tokens and noise mask (or split point) both produce the same example, id for id.

The t5 package is not a dependency: the span-corruption ops are implemented here with
TensorFlow ops following ``t5.data.preprocessors`` (random_spans_noise_mask,
noise_span_to_unique_sentinel, ...). Everything here imports tensorflow and seqio, so import
this module only for data work, never from training or evaluation code.
"""

from __future__ import annotations

import functools
import os

import seqio
import tensorflow as tf

from repeat_scaling.data import span_corruption as span_lib
from repeat_scaling.data import ul2_denoisers as denoisers_lib
from repeat_scaling.data.vocab import load_vocab_info, seqio_vocabulary

DEFAULT_TFDS_NAME = "c4/en:3.1.0"
MAX_CHUNK_TOKENS = 65536
CONCAT_BATCH = 128

#: Task suffixes of ``ul2_denoisers.default_ul2_denoisers()``, in its order.
UL2_TASKS = ("r1", "r2", "s", "x1", "x2", "x3", "x4")


def ul2_denoisers() -> list[tuple[str, denoisers_lib.Denoiser]]:
    """``(task suffix, Denoiser)`` of the UL2 mixture: the native objective's defaults."""
    denoisers = denoisers_lib.parse_denoisers(denoisers_lib.default_ul2_denoisers())
    if len(denoisers) != len(UL2_TASKS):
        raise ValueError(f"UL2_TASKS {UL2_TASKS} do not name the {len(denoisers)} denoisers")
    return list(zip(UL2_TASKS, denoisers, strict=True))


# ------------------------------------------------------------------------------------------
# TF ops (after t5.data.preprocessors)
# ------------------------------------------------------------------------------------------


def random_spans_helper(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """Raw tokens per segment so that corrupted inputs (+EOS) fit ``inputs_length`` exactly.

    Returns (tokens_length, targets_length); e.g. (568, 114) for T5's 512 / 0.15 / 3.
    """

    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def random_spans_noise_mask(length, noise_density, seeds, mean_noise_span_length=3.0):
    """Boolean [length] mask of noise spans (T5): round(length*density) noise tokens."""
    orig_length = length
    length = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items, num_segments, seed):
        first = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
        first = tf.pad(seqio.stateless_shuffle(first, seed), [[1, 0]])
        segment_id = tf.cumsum(first)
        return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)

    noise_lengths = segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = segmentation(num_nonnoise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2])
    span_starts = tf.cumsum(interleaved)[:-1]
    indicator = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
    is_noise = tf.equal(tf.cumsum(indicator) % 2, 1)
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size):
    """Replace each noise span by one sentinel (vocab_size-1, vocab_size-2, ...)."""
    prev_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_noise))
    subsequent_noise = tf.logical_and(noise_mask, prev_noise)
    sentinel = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise))


@seqio.map_over_dataset(num_seeds=1)
def select_random_chunk(x, seed, max_length=MAX_CHUNK_TOKENS):
    """Keep a random chunk of at most ``max_length`` tokens of ``targets``."""
    tokens = x["targets"]
    n = tf.size(tokens)
    num_segments = tf.cast(tf.math.ceil(n / max_length), tf.int32)
    start = max_length * tf.random.stateless_uniform(
        [], seed, 0, tf.maximum(num_segments, 1), tf.int32
    )
    return {"targets": tokens[start : tf.minimum(start + max_length, n)]}


def reduce_concat_tokens(dataset, batch_size=CONCAT_BATCH):
    """Concatenate ``batch_size`` consecutive documents' tokens (no separator, as T5)."""
    dataset = dataset.map(lambda x: {"targets": x["targets"]})
    dataset = dataset.padded_batch(batch_size, padded_shapes={"targets": [-1]})

    def flatten(x):
        t = tf.reshape(x["targets"], [-1])
        return {"targets": tf.boolean_mask(t, tf.not_equal(t, 0))}

    return dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(dataset, length):
    """Split each example's ``targets`` into segments of ``length`` tokens (last shorter)."""

    def split(x):
        t = x["targets"]
        n = tf.size(t)
        num = tf.cast(tf.math.ceil(n / length), tf.int32)
        padded = tf.pad(t, [[0, num * length - n]])
        lengths = tf.concat([tf.fill([num - 1], length), [n - (num - 1) * length]], 0)
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.reshape(padded, [num, length]), "_len": lengths}
        )

    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0).flat_map(split)
    return dataset.map(lambda x: {"targets": x["targets"][: x["_len"]]})


def corrupt(tokens, noise_mask, vocab_size, mode_token=None):
    """Span-corrupt one example: ``{"inputs", "targets"}`` before EOS (seqio adds it).

    Inputs: the non-noise tokens with one sentinel per noise span, after the mode token
    when one is given; targets: each sentinel followed by its span. The same example as
    ``data.span_corruption.span_corrupt_batch`` for the same tokens and mask (which also adds EOS).
    """
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size)
    if mode_token is not None:
        inputs = tf.concat([tf.constant([mode_token], inputs.dtype), inputs], 0)
    return {
        "inputs": inputs,
        "targets": noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocab_size),
    }


def span_corruption(
    dataset,
    sequence_length,
    output_features,
    noise_density=0.15,
    mean_noise_span_length=3.0,
    mode_token=None,
):
    """T5 span corruption: chunk, concat, split to fit ``inputs``, denoise with sentinels.

    ``mode_token``: a UL2 mode token id (``data.ul2_denoisers.mode_token_id``) put first in the
    inputs; the segments are one token shorter so that the inputs still fit.
    """
    budget = sequence_length["inputs"] - (0 if mode_token is None else 1)
    tokens_length, _ = random_spans_helper(budget, noise_density, mean_noise_span_length)
    vocabulary = output_features["inputs"].vocabulary
    vocab_size = vocabulary.vocab_size
    _, spans = span_lib.noise_counts(tokens_length, noise_density, mean_noise_span_length)
    free = vocabulary.extra_ids - (0 if mode_token is None else denoisers_lib.NUM_MODE_TOKENS)
    if spans > free:
        raise ValueError(
            f"span corruption (density={noise_density}, span={mean_noise_span_length}) of "
            f"{tokens_length} tokens needs {spans} sentinels; the vocabulary has {free} "
            "free extra ids: use a shorter inputs length"
        )
    dataset = select_random_chunk(dataset)
    dataset = reduce_concat_tokens(dataset)
    dataset = split_tokens(dataset, tokens_length)

    @seqio.map_over_dataset(num_seeds=2)
    def denoise(x, seeds):
        tokens = x["targets"]
        mask = random_spans_noise_mask(
            tf.size(tokens), noise_density, seeds, mean_noise_span_length
        )
        return corrupt(tokens, mask, vocab_size, mode_token)

    return denoise(dataset)


def prefix_lm(dataset, sequence_length, output_features, mode_token=None):
    """T5 prefix LM: ``inputs``-length segments split at a uniform random point.

    ``mode_token``: a UL2 mode token id put first in the inputs (segments one shorter).
    """
    length = sequence_length["inputs"] - (0 if mode_token is None else 1)
    dataset = select_random_chunk(dataset)
    dataset = reduce_concat_tokens(dataset)
    dataset = split_tokens(dataset, length)
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) >= 2)

    @seqio.map_over_dataset(num_seeds=1)
    def split_point(x, seed):
        tokens = x["targets"]
        k = tf.random.stateless_uniform([], seed, 1, tf.size(tokens), tf.int32)
        inputs = tokens[:k]
        if mode_token is not None:
            inputs = tf.concat([tf.constant([mode_token], inputs.dtype), inputs], 0)
        return {"inputs": inputs, "targets": tokens[k:]}

    return split_point(dataset)


def causal_lm(dataset, sequence_length):
    """Decoder-only LM: concatenate documents and split into ``targets``-length segments."""
    dataset = reduce_concat_tokens(dataset)
    return split_tokens(dataset, sequence_length["targets"])


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------


def _source(tfds_name: str, tfds_data_dir: str | None) -> seqio.DataSource:
    if tfds_data_dir and os.path.isfile(os.path.join(tfds_data_dir, "dataset_info.json")):
        # A prepared TFDS directory (tfds.builder_from_directory), e.g. a local C4 copy;
        # seqio's TfdsDataSource cannot load those, so read it through tfds directly.
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(tfds_data_dir)

        def dataset_fn(split, shuffle_files, seed=None):
            read_config = tfds.ReadConfig(shuffle_seed=seed)
            return builder.as_dataset(
                split=split, shuffle_files=shuffle_files, read_config=read_config
            )

        return seqio.FunctionDataSource(
            dataset_fn,
            splits=list(builder.info.splits),
            num_input_examples={
                s: builder.info.splits[s].num_examples for s in builder.info.splits
            },
        )
    return seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)


def register_c4_tasks(
    vocab: str = "byte",
    tfds_name: str = DEFAULT_TFDS_NAME,
    tfds_data_dir: str | None = None,
    prefix: str = "repeat_scaling_c4",
) -> list[str]:
    """Register the C4 tasks and the UL2 mixture; returns the registered names.

    Args:
      vocab: ``byte`` or a SentencePiece ``.model`` path (seqio vocabulary with 100 extra ids).
      tfds_name: TFDS name and version (ignored when ``tfds_data_dir`` is a prepared
        dataset directory holding ``dataset_info.json``).
      tfds_data_dir: TFDS data_dir (local or gs://) or a prepared dataset directory.
      prefix: name prefix; re-registering the same names replaces them.
    """
    info = load_vocab_info(vocab)
    vocabulary = seqio_vocabulary(info)
    source = _source(tfds_name, tfds_data_dir)
    tokenize = [
        functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
        seqio.preprocessors.tokenize,
    ]
    enc_dec = {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    tasks = {
        f"{prefix}_span_corruption": [
            *tokenize,
            span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        f"{prefix}_prefix_lm": [*tokenize, prefix_lm, seqio.preprocessors.append_eos_after_trim],
    }
    ul2 = ul2_denoisers()
    for name, d in ul2:
        mode = denoisers_lib.mode_token_id(info, d.name)
        if d.is_span:
            fn = functools.partial(
                span_corruption,
                noise_density=d.noise_density,
                mean_noise_span_length=d.mean_noise_span_length,
                mode_token=mode,
            )
        else:
            fn = functools.partial(prefix_lm, mode_token=mode)
        tasks[f"{prefix}_ul2_{name}"] = [*tokenize, fn, seqio.preprocessors.append_eos_after_trim]
    names = []
    for name, preprocessors in tasks.items():
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=source, preprocessors=preprocessors, output_features=enc_dec
        )
        names.append(name)
    name = f"{prefix}_causal_lm"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[*tokenize, causal_lm],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
    )
    names.append(name)
    mixture = f"{prefix}_ul2"
    seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, [(f"{prefix}_ul2_{n}", d.rate) for n, d in ul2])
    names.append(mixture)
    return names
