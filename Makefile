# The two commands of the README: set everything up, then run the demo or the tests.
.PHONY: demo test
demo:
	bash scripts/demo.sh $(ARGS)
test:
	bash scripts/test.sh $(ARGS)
