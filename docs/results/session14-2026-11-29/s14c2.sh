# session 14 call 2, one H200 host: where one image's preprocessing goes, resizes split over 1-8 threads (CPU only)
source .devrun/setup.sh
date -u
python3 -c "import PIL, numpy; print('Pillow', PIL.__version__, 'numpy', numpy.__version__)"
timeout 300 python3 -m bench.preprocess_probe --out $OUT --threads 1,2,4,8 --repeats 15 2>&1 | tail -45
date -u
