# Injected into llama.cpp's project() by launch/setup.sh (CMAKE_PROJECT_INCLUDE): llama-cpp-python forces
# llama.cpp's `common` library on, which its Python bindings never load and which takes half of the build
# (88 s instead of 170 s on 2 cores). A normal variable here shadows that cache setting in llama.cpp's
# scope, so neither the library nor its install rule is generated.
set(LLAMA_BUILD_COMMON OFF)
