from setuptools import find_packages, setup

setup(
    name="glb",
    version="0.1.0",
    description="WebSocket and HTTP load balancer built on gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["glb", "glb.*"]),
    include_package_data=True,
    package_data={"glb": ["static/*"]},
    install_requires=[
        "gevent>=24.2",
        "gevent-websocket==0.10.1",
        "requests>=2.31",
        "blinker>=1.7",
        "httptools>=0.6",
        "urllib3>=2",
        "prometheus_client>=0.20",
    ],
    entry_points={"console_scripts": ["glb = glb.__main__:main", "glb-ctl = glb.ctl:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: Gevent",
        "Topic :: Internet :: Proxy Servers",
    ],
)
