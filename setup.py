"""nanoflux_jax: FLUX.1 in pure JAX, compressed NanoFLUX-style for phones."""
import setuptools

setuptools.setup(
    name='nanoflux_jax',
    version='0.1.0',
    description=('FLUX.1-schnell in pure JAX/Flax: import, compress, distill '
                 'and export to TFLite (NanoFLUX).'),
    long_description=open('README.md').read() if __import__('os').path.exists(
        'README.md') else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['nanoflux_jax', 'nanoflux_jax.*']),
    # The shipped shapes-world teacher and classifier (orbax folders,
    # tokenizers, READMEs): see nanoflux_jax/shapes/assets/*/README.md.
    package_data={'nanoflux_jax': ['shapes/assets/**/*']},
    include_package_data=True,
    install_requires=[
        'jax>=0.7',
        'flax>=0.10',
        'optax',
        'orbax-checkpoint',
        'ml_collections',
        'absl-py',
        'numpy',
        'ml_dtypes',
        'pillow',
        'scipy',       # toy-FID's matrix square root.
        'tqdm',
        'transformers',  # tokenizers only (PyTorch is not needed for them).
        'sentencepiece',
        'tokenizers',
        'protobuf',
    ],
    extras_require={
        # PyTorch references for the parity tests. torch is pinned: an
        # unpinned torch pulls a multi-GB CUDA build.
        'dev': ['pytest', 'torch==2.13.0', 'diffusers', 'transformers',
                'sentencepiece', 'safetensors'],
        'export': ['tensorflow-cpu', 'ai-edge-litert', 'ai-edge-quantizer'],
    },
)
