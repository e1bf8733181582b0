"""Tiny offline tokenizers that look like FLUX's, trained on the fly.

  tokenizer_2 (T5): a sentencepiece unigram model (`make_t5_tokenizer`);
  tokenizer (CLIP): a byte-level BPE with '</w>' learned on the same
    sentences (`make_clip_tokenizer`).

Nothing is downloaded. `tiny_flux.make_tiny_flux_pipeline` builds the rest of
a tiny FluxPipeline around them; the shapes world trains its own on its
captions.
"""
import io
import json
import pathlib
import re

# Varied English sentences (the toy "shapes" world plus some generic photo
# prompts). Used to train both tokenizers.
SENTENCES = (
    'a photo of a cat',
    'a photo of a dog',
    'the red circle is on the left of the blue square',
    'a blue square on the right of a red circle',
    'a green triangle above a yellow star',
    'the cat is sitting on the mat',
    'a dog runs in the park with a ball',
    'two cats and one dog on a sofa',
    'a small red circle and a large blue square',
    'a large green circle below a small yellow triangle',
    'an orange square to the left of a purple circle',
    'a black and white photo of a city street at night',
    'the sun sets over the mountains',
    'a bowl of fruit on a wooden table',
    'a painting of a boat on the sea',
    'a close up photo of a red apple',
    'three blue circles in a row',
    'a white square in the center of the image',
    'a cat wearing a hat, digital art',
    'a dog and a cat playing together in the snow',
    'the left circle is red and the right square is blue',
    'an astronaut riding a horse on the moon',
    'a cozy cabin in the woods with smoke from the chimney',
    'a portrait photo of an old man with a beard',
    'a bright yellow flower in a green field',
    'four squares: red, green, blue and yellow',
    'a circle inside a square inside a triangle',
    'the quick brown fox jumps over the lazy dog',
    'a picture of a car parked near a house',
    'a bird sitting on a tree branch in spring',
    'a cup of coffee next to a laptop',
    'a pixel art image of a castle',
    'a big blue circle at the top and a small red square at the bottom',
    'the dog is to the right of the cat',
    'a photograph of a beach with palm trees',
    'an illustration of a robot reading a book',
    'a glass of water on the left, a glass of milk on the right',
    'purple, orange and pink shapes on a gray background',
    'a watercolor painting of a lighthouse',
    'one cat, two dogs, 3 birds and 4 fish',
)

T5_MAX_LENGTH = 512  # FLUX's tokenizer_2 model_max_length
CLIP_MAX_LENGTH = 77
T5_VOCAB_SIZE = 300  # sentencepiece target (a soft limit)
CLIP_NUM_MERGES = 200  # BPE merges on top of the 512 byte symbols


# ---------------------------------------------------------------------------
# T5 tokenizer (sentencepiece unigram)
# ---------------------------------------------------------------------------


_PRINTABLE = ''.join(chr(c) for c in range(33, 127))


def _t5_corpus(sentences):
  """`sentences` as written, capitalised with a full stop, and in caps."""
  out = list(sentences)
  out += [s[0].upper() + s[1:] + '.' for s in sentences]
  out += [s.upper() for s in sentences[::3]]
  out.append('0123456789 ' + _PRINTABLE)
  return out


def _train_spm(vocab_size, sentences, model_type='unigram'):
  """Trains a T5-style sentencepiece unigram model; returns its serialized bytes."""
  # Deferred: sentencepiece is needed only to build a tokenizer.
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_t5_corpus(sentences)),
      model_writer=buf,
      model_type=model_type,
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      character_coverage=1.0,
      normalization_rule_name='nmt_nfkc',
      pad_id=0, pad_piece='<pad>',
      eos_id=1, eos_piece='</s>',
      unk_id=2, unk_piece='<unk>',
      bos_id=-1,
      byte_fallback=False,
      required_chars=_PRINTABLE,
      num_threads=1,
      seed_sentencepiece_size=10000,
      shuffle_input_sentence=False,
      minloglevel=2,
  )
  return buf.getvalue()


def make_t5_tokenizer(directory, vocab_size=T5_VOCAB_SIZE,
                      sentences=SENTENCES, model_type='unigram'):
  """A tiny FLUX tokenizer_2 look-alike, saved to and reloaded from `directory`.

  A sentencepiece unigram model (pad 0 '<pad>', eos 1 '</s>', unk 2 '<unk>', no
  bos, nmt_nfkc normalisation) trained on `sentences`, wrapped as a
  `transformers.T5Tokenizer` (tokenizers-backed) with no extra ids and
  model_max_length 512. Like FLUX's it appends '</s>' and pads with 0.
  `directory` also receives the raw `spiece.model`. model_type='word' fits
  whole whitespace-separated words (a closed toy vocabulary such as the
  shapes world's captions, where unigram pieces would split words).

  Returns:
    the `transformers.T5Tokenizer` loaded back from `directory`.
  """
  # Deferred: transformers is heavy (and imports torch when installed).
  import transformers  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  model_bytes = _train_spm(vocab_size, list(sentences), model_type)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  vocab = [(p.piece, p.score) for p in proto.pieces]
  assert vocab[:3] == [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0)], vocab[:3]
  tok = transformers.T5Tokenizer(
      vocab=vocab,
      _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
      extra_ids=0,
      model_max_length=T5_MAX_LENGTH,
  )
  tok.save_pretrained(directory)
  (directory / 'spiece.model').write_bytes(model_bytes)
  return transformers.T5Tokenizer.from_pretrained(directory)


# ---------------------------------------------------------------------------
# CLIP tokenizer (byte-level BPE with '</w>')
# ---------------------------------------------------------------------------


def _bytes_to_unicode():
  """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
        + list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def _clip_words(sentences):
  """CLIP's pre-tokenisation (lower-case, regex split, byte-level characters)."""
  byte_encoder = _bytes_to_unicode()
  pattern = re.compile(
      r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
  words = []
  for s in sentences:
    s = re.sub(r'\s+', ' ', s.strip().lower())
    for w in pattern.findall(s):
      words.append(''.join(byte_encoder[b] for b in w.encode('utf-8')))
  return words


def _learn_bpe(words, num_merges):
  """Deterministic BPE on words split into symbols, '</w>' on the last one."""
  freqs = {}
  for w in words:
    key = tuple(w[:-1]) + (w[-1] + '</w>',)
    freqs[key] = freqs.get(key, 0) + 1
  merges = []
  for _ in range(num_merges):
    pairs = {}
    for word, f in freqs.items():
      for a, b in zip(word[:-1], word[1:]):
        pairs[(a, b)] = pairs.get((a, b), 0) + f
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    new = {}
    for word, f in freqs.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      new[tuple(out)] = new.get(tuple(out), 0) + f
    freqs = new
  return merges


def make_clip_tokenizer(directory, num_merges=CLIP_NUM_MERGES,
                        sentences=SENTENCES):
  """A tiny FLUX `tokenizer/` look-alike, saved to and reloaded from `directory`.

  The vocab is laid out like CLIP's: the 256 byte characters, the same with the
  '</w>' end-of-word suffix, the learned merges in order, then
  '<|startoftext|>' and '<|endoftext|>' LAST (the largest id, so CLIP's legacy
  argmax(input_ids) pooling lands on the first EOS). Lower-cases; pad token is
  '<|endoftext|>'; model_max_length 77. `directory` holds vocab.json and
  merges.txt (in CLIP's '#version' format) besides tokenizer.json.

  Returns:
    the `transformers.CLIPTokenizer` loaded back from `directory`.
  """
  # Deferred: transformers is heavy (and imports torch when installed).
  import transformers  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  chars = list(_bytes_to_unicode().values())
  merges = _learn_bpe(_clip_words(sentences), num_merges)
  tokens = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  assert len(set(tokens)) == len(tokens), 'duplicate BPE tokens'
  vocab = {t: i for i, t in enumerate(tokens)}
  vocab_file = directory / 'vocab.json'
  merges_file = directory / 'merges.txt'
  vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding='utf-8')
  merges_file.write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges),
      encoding='utf-8')
  tok = transformers.CLIPTokenizer(
      vocab=vocab, merges=list(merges),
      model_max_length=CLIP_MAX_LENGTH)
  tok.save_pretrained(directory)
  # Keep our CLIP-format files (save_pretrained may rewrite or omit them).
  vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding='utf-8')
  merges_file.write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges),
      encoding='utf-8')
  return transformers.CLIPTokenizer.from_pretrained(directory)

