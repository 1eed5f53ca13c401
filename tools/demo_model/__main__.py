"""CLI: python -m tools.demo_model {build,synth,train,evaluate,ship,overfit} --out build/demo"""
from .cli import main

main()
